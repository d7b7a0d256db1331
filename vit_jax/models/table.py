"""Parameter counts and FLOPs of registered models, from abstract shapes.

Nothing is materialised: parameters come from `jax.eval_shape` of `init`, and
FLOPs from XLA's cost analysis of the lowered forward pass, so even ViT-H/14
is counted in seconds without allocating its 2.5 GB of weights.
"""

import dataclasses
from typing import Iterable, List, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import models


@dataclasses.dataclass(frozen=True)
class ModelStats:
  """Size and cost of one model at one resolution (per image)."""

  name: str
  resolution: int
  params: int
  gflops: float


def abstract_variables(model: nn.Module, resolution: int) -> dict:
  """The model's variables as `jax.ShapeDtypeStruct`s for one image."""
  images = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)
  return jax.eval_shape(
    lambda rng, x: model.init(rng, x, train=False), jax.random.key(0), images
  )


def count_params(variables) -> int:
  """Total number of scalars in a (possibly abstract) variable tree."""
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(variables)))


def forward_flops(model: nn.Module, variables, resolution: int) -> float:
  """FLOPs of one image's forward pass as XLA counts them (2 per MAC)."""
  images = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  analysis = forward.lower(variables, images).cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older JAX returned one per device.
    analysis = analysis[0]
  return float(analysis['flops'])


def model_stats(
  name: str, num_classes: int = 1000, resolution: Optional[int] = None
) -> ModelStats:
  """Parameters and GFLOPs of registered model `name`."""
  resolution = resolution or models.DEFAULT_RESOLUTIONS[name]
  model = models.get_model(name, num_classes=num_classes)
  variables = abstract_variables(model, resolution)
  return ModelStats(
    name,
    resolution,
    count_params(variables),
    forward_flops(model, variables, resolution) / 1e9,
  )


def format_table(rows: Iterable[ModelStats], num_classes: int) -> str:
  """A Markdown table of `rows`."""
  lines = [
    f'| model | resolution | parameters ({num_classes} classes) '
    '| GFLOPs / image |',
    '|---|---:|---:|---:|',
  ]
  for row in rows:
    lines.append(
      f'| {row.name} | {row.resolution} | {row.params:,} | {row.gflops:.2f} |'
    )
  return '\n'.join(lines)


def model_table(
  names: Optional[List[str]] = None, num_classes: int = 1000
) -> str:
  """The table for `names` (default: every registered model)."""
  names = names or list(models.MODEL_CONFIGS)
  return format_table((model_stats(n, num_classes) for n in names), num_classes)
