"""Attention maps of Vision Transformers: weights, rollout, per-head maps.

See `maps` for the computations; they return arrays, so notebooks can plot
them as they like.
"""

from vit_jax.attention.maps import HEAD_FUSIONS
from vit_jax.attention.maps import attention_weights
from vit_jax.attention.maps import fuse_heads
from vit_jax.attention.maps import patch_grid
from vit_jax.attention.maps import rollout
from vit_jax.attention.maps import token_map

__all__ = [
  'HEAD_FUSIONS',
  'attention_weights',
  'fuse_heads',
  'patch_grid',
  'rollout',
  'token_map',
]
