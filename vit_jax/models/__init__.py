"""Model zoo: ViT (and hybrids), MLP-Mixer, Swin Transformer, ResNet
baselines, and the registry that names them.

  model = models.get_model('ViT-B_16', num_classes=1000)
  variables = model.init(rng, images, train=False)
  logits = model.apply(variables, images, train=False)
"""

import dataclasses
from typing import Any, Mapping

import flax.linen as nn

from vit_jax.models.mixer import MlpMixer
from vit_jax.models.registry import DEFAULT_RESOLUTIONS
from vit_jax.models.registry import MODEL_CONFIGS
from vit_jax.models.resnet import ResNet
from vit_jax.models.swin import SwinTransformer
from vit_jax.models.vit import AddPositionEmbs
from vit_jax.models.vit import Encoder
from vit_jax.models.vit import Encoder1DBlock
from vit_jax.models.vit import MlpBlock
from vit_jax.models.vit import VisionTransformer

__all__ = [
  'AddPositionEmbs',
  'DEFAULT_RESOLUTIONS',
  'Encoder',
  'Encoder1DBlock',
  'MODEL_CONFIGS',
  'MlpBlock',
  'MlpMixer',
  'ResNet',
  'SwinTransformer',
  'VisionTransformer',
  'build_model',
  'get_model',
  'model_class',
]


# Model name prefix → module class; names without one of these are ViTs.
_CLASS_BY_PREFIX = {
  'Mixer-': MlpMixer,
  'ResNet-': ResNet,
  'Swin-': SwinTransformer,
}


def model_class(model_name: str) -> type:
  """The module class of a registered name, by its prefix (default: ViT)."""
  for prefix, cls in _CLASS_BY_PREFIX.items():
    if model_name.startswith(prefix):
      return cls
  return VisionTransformer


def build_model(model_config: Mapping[str, Any], **overrides) -> nn.Module:
  """Builds a model from its config (e.g. an experiment's `config.model`).

  Args:
    model_config: keyword arguments of the model class, including
      `model_name`, as returned by a `get_<name>_config()` function.
    **overrides: further keyword arguments, e.g. `num_classes`, `dtype`,
      `classifier`; they take precedence over `model_config`.

  Returns:
    An unbound Flax module.
  """
  kwargs = dict(
    model_config.to_dict() if hasattr(model_config, 'to_dict') else model_config
  )
  kwargs.update(overrides)
  cls = model_class(kwargs.get('model_name') or '')
  known = {field.name for field in dataclasses.fields(cls)}
  unknown = sorted(set(kwargs) - known)
  if unknown:
    raise TypeError(
      f'{cls.__name__} ({kwargs.get("model_name")}) has no option(s) '
      f'{unknown}; valid options: {sorted(known - {"parent", "name"})}.'
    )
  return cls(**kwargs)


def get_model(name: str, **overrides) -> nn.Module:
  """Builds the registered model `name` (e.g. 'ViT-B_16', 'Mixer-B_16').

  Args:
    name: a key of `MODEL_CONFIGS`.
    **overrides: see `build_model`; `num_classes` is usually needed.
  """
  if name not in MODEL_CONFIGS:
    raise KeyError(
      f'Unknown model {name!r}. Registered models: '
      f'{", ".join(sorted(MODEL_CONFIGS))}.'
    )
  return build_model(MODEL_CONFIGS[name], **overrides)
