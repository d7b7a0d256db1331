"""A model's parameters from a checkpoint: initial params of a run, and a
plain model rebuilt from one file.
"""

from typing import Any, Callable, Mapping, Optional, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import models
from vit_jax import paths
from vit_jax import trainable as trainable_lib
from vit_jax.checkpoint import load_pretrained
from vit_jax.checkpoint import read
from vit_jax.errors import CheckpointError
from vit_jax.models import table

PyTree = Any


def check_exists(pretrained_path: Optional[str]) -> None:
  """A CheckpointError, before any data is read or anything compiles, when
  the configured checkpoint is missing (a fine-tuning config never trains
  from scratch by accident)."""
  if pretrained_path is None or paths.exists(pretrained_path):
    return
  raise CheckpointError(
    f'{paths.absolute(pretrained_path)}: no such file, and the config '
    'fine-tunes it. Put the '
    "checkpoint there (Google's are in gs://vit_models/imagenet21k/ and "
    'gs://vit_models/augreg/), or point --config.pretrained_dir=DIR (DIR/'
    'MODEL_NAME.npz) or --config.pretrained_path=FILE at it; '
    '--config.pretrained_dir= trains from scratch.'
  )


def init_params(
  model: Any,
  crop: int,
  *,
  seed: int,
  pretrained_path: Optional[str] = None,
  model_config: Optional[Mapping[str, Any]] = None,
  is_added: Callable[[str], bool] = lambda path: False,
) -> PyTree:
  """The model's initialised params, then the pretrained checkpoint's.

  Args:
    model: the Flax model (injected or not).
    crop: the input side the model is initialised at.
    seed: of the initialisers.
    pretrained_path: a checkpoint of any format `checkpoint.read` reads;
      None trains from scratch.
    model_config: the model's config (`config.model`), for the checkpoint.
    is_added: leaves the fine-tuning mode adds (injected parameters): not in
      the checkpoint, they keep their initial values.
  """
  params = jax.jit(
    lambda key: model.init(key, jnp.zeros([1, crop, crop, 3]), train=False)[
      'params'
    ]
  )(jax.random.key(seed))
  if pretrained_path is None:
    logging.info('No pretrained checkpoint configured: training from scratch.')
    return params
  logging.info('Initialising from %s', pretrained_path)
  added, base = trainable_lib.partition(params, is_added)
  loaded = load_pretrained(
    pretrained_path=pretrained_path,
    init_params=base,
    model_config=model_config or {},
  )
  return trainable_lib.combine(loaded, added)


def zero_params(model: Any, crop: int) -> PyTree:
  """Zeros in the model's parameter shapes at `crop` (no initialiser run):
  the target structure for loading a checkpoint."""
  shapes = table.abstract_variables(model, crop)['params']
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def model_from_checkpoint(
  model_config: Mapping[str, Any], path: str, crop: int
) -> Tuple[Any, PyTree]:
  """A plain model and its parameters from one checkpoint file.

  The model is `model_config` with the checkpoint's head size and source
  options (e.g. timm's exact GELU); the parameters are adapted to `crop`
  (position embeddings resized if the checkpoint has another grid).
  """
  model_config = dict(model_config)
  heads = (model_config.get('transformer') or {}).get('num_heads')
  ckpt = read(path, num_heads=heads)
  head = ckpt.params.get('head', {}).get('kernel')
  model_config.update(ckpt.model_options)
  model = models.build_model(
    model_config, num_classes=None if head is None else head.shape[-1]
  )
  params = load_pretrained(
    pretrained_path=ckpt,
    model_config=model_config,
    reset_head=False,
    init_params=zero_params(model, crop),
  )
  return model, params
