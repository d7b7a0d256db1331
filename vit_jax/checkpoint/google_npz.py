"""Google's `.npz` checkpoints (gs://vit_models), read and written.

A published file is a flat `np.savez` archive whose keys are '/'-joined
parameter paths. Three layouts exist and all are read:

* ImageNet-21k / ImageNet files (the first release) use pre-linen module
  names inside each encoder block: `LayerNorm_0`, `MultiHeadDotProductAttention_1`,
  `LayerNorm_2`, `MlpBlock_3` (numbered by creation order across all
  submodules, as old Flax did). They become `LayerNorm_0`,
  `MultiHeadDotProductAttention_0`, `LayerNorm_1`, `MlpBlock_0`.
* AugReg files use the linen names directly.
* big_vision-style files prefix every key with `params/`.

Hybrid (R+ViT) files store GroupNorm scales and biases with extra unit
dimensions, `(1, 1, 1, C)`; they are squeezed to `(C,)`.

Files are written in the first layout (pre-linen names), the one both
vit_jax's `checkpoint.load` and timm's `.npz` loader read by default.
"""

import re
from typing import Dict, Mapping

import numpy as np

Flat = Dict[str, np.ndarray]

# Pre-linen name → linen name, inside `Transformer/encoderblock_{i}`.
_PRE_LINEN_BLOCK_NAMES = {
  'LayerNorm_0': 'LayerNorm_0',
  'MultiHeadDotProductAttention_1': 'MultiHeadDotProductAttention_0',
  'LayerNorm_2': 'LayerNorm_1',
  'MlpBlock_3': 'MlpBlock_0',
}
_LINEN_BLOCK_NAMES = {v: k for k, v in _PRE_LINEN_BLOCK_NAMES.items()}
_BLOCK = re.compile(r'^(.*encoderblock_\d+)/([^/]+)/(.*)$')
_GROUP_NORM = re.compile(r'(^|/)gn(\d+|_root|_proj)/(scale|bias)$')


def from_google(flat: Mapping[str, np.ndarray]) -> Flat:
  """Google's keys (any of the three layouts) → this project's flat paths."""
  if any(key.startswith('params/') for key in flat):
    flat = {
      key[len('params/') :]: value
      for key, value in flat.items()
      if key.startswith('params/')
    }
  converted = {}
  for key, value in flat.items():
    key = _rename_block_module(key, _PRE_LINEN_BLOCK_NAMES)
    if _GROUP_NORM.search(key):
      value = value.reshape(value.shape[-1:])
    converted[key] = value
  return converted


def to_google(flat: Mapping[str, np.ndarray]) -> Flat:
  """This project's flat paths → Google's published (pre-linen) keys."""
  return {
    _rename_block_module(key, _LINEN_BLOCK_NAMES): np.asarray(value)
    for key, value in flat.items()
  }


def _rename_block_module(key: str, names: Mapping[str, str]) -> str:
  """Renames the module directly inside an encoder block using `names`."""
  match = _BLOCK.match(key)
  if not match or match.group(2) not in names:
    return key
  return f'{match.group(1)}/{names[match.group(2)]}/{match.group(3)}'
