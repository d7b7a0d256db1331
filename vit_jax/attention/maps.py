"""What a ViT attends to: its attention weights, rollout and per-head maps.

The weights come from the model's own forward pass (each Encoder1DBlock sows
its softmaxed attention when built with `sow_attention_weights=True`), not
from a re-implementation of attention. A model with a scanned or
rematerialised encoder runs here as its plain equivalent, one block per
layer with the explicit attention, on its parameters unstacked:

  weights = attention_weights(model, params, images)   # [L, N, H, T, T]
  grid = patch_grid(model, images.shape[1:3])
  rolled = rollout(weights)                            # [N, T, T]
  heat = token_map(rolled, model.classifier, grid)     # [N, rows, cols]
  heads = token_map(weights, model.classifier, grid)   # [L, N, H, rows, cols]

Rollout (Abnar & Zuidema, 2020): fuse each layer's heads (mean, max or min),
add the identity for the residual connection, renormalise the rows, and
multiply the layers' matrices from the first to the last. A class-token
model's map is the class token's row over the patch tokens; a model without
a class token (global average pooling) gets the mean over all query rows.
"""

import dataclasses
import re
from typing import Any, Tuple

import jax
import jax.numpy as jnp

from vit_jax.checkpoint import layer_stack
from vit_jax.errors import ConfigError
from vit_jax.models import vit

Array = jax.Array
HEAD_FUSIONS = ('mean', 'max', 'min')
_BLOCK = re.compile(r'encoderblock_(\d+)$')


# Why a model class without `sow_attention_weights` gets no maps.
_NO_MAPS = {
  'MlpMixer': 'has no attention: it mixes tokens with MLPs',
  'ResNet': 'has no attention: it is a convolutional network',
  'SwinTransformer': (
    'attends only within shifted local windows, which this tool does not '
    'draw (it draws global attention over the patch grid)'
  ),
}
_NEEDED = 'attention maps need a plain ViT model (e.g. ViT-B_16, ViT-Micro_4)'


def _base(model: Any) -> Any:
  """The model under any injected fine-tuning (`finetune.InjectedModel`)."""
  return _base(model.base) if hasattr(model, 'injection') else model


def _label(model: Any) -> str:
  """'Mixer-B_16 (MlpMixer)': the registry name, when set, and the class."""
  cls = type(model).__name__
  name = getattr(model, 'model_name', None)
  return f'{name} ({cls})' if name else cls


def check_supported(model: Any) -> None:
  """Raises ConfigError naming `model` unless maps can be drawn for it.

  Maps need a plain ViT (or an injected one): a Mixer, ResNet or Swin
  records no global attention, and a hybrid's patch grid depends on its
  ResNet root. Checked before any image is read, so the command line says
  so in one line rather than with a traceback mid-way.
  """
  base = _base(model)
  if not hasattr(base, 'sow_attention_weights'):
    reason = _NO_MAPS.get(
      type(base).__name__, 'has no attention layers this tool can record'
    )
    raise ConfigError(f'{_label(base)} {reason}; {_NEEDED}.')
  if getattr(base, 'resnet', None) is not None:
    raise ConfigError(
      f'{_label(base)} is a hybrid, whose patch grid depends on its ResNet '
      f'root, which this tool does not follow; {_NEEDED}.'
    )


# The encoder options that compute what the plain encoder computes, but
# record the weights another way or not at all; maps run without them.
_PLAIN_ENCODER = {'scan': False, 'remat': False, 'attention': 'explicit'}


def _with_sown_attention(model: Any) -> Any:
  """The same model (injected or not) recording its attention weights, one
  block per layer (`_PLAIN_ENCODER`)."""
  if hasattr(model, 'injection'):  # finetune.InjectedModel
    return dataclasses.replace(model, base=_with_sown_attention(model.base))
  if not hasattr(model, 'sow_attention_weights'):
    check_supported(model)  # Raises, naming the model.
  transformer = model.transformer
  if transformer is not None:
    transformer = {**transformer, **_PLAIN_ENCODER}
  return model.clone(sow_attention_weights=True, transformer=transformer)


def attention_weights(model: Any, params: Any, images: Array) -> Array:
  """Every layer's softmaxed attention, `[layers, batch, heads, T, T]`.

  Args:
    model: a VisionTransformer (or an injected one, see `vit_jax.finetune`).
    params: its parameters.
    images: `[batch, height, width, 3]`, preprocessed as for evaluation.
  """
  _, state = _with_sown_attention(model).apply(
    {'params': layer_stack.to_file_layout(params)},
    images,
    train=False,
    mutable=['intermediates'],
  )
  blocks = state.get('intermediates', {}).get('Transformer', {})
  layers = sorted(
    (int(m.group(1)), name) for name in blocks if (m := _BLOCK.match(name))
  )
  if not layers:
    raise ValueError(
      'The model recorded no attention weights; attention maps need a '
      'VisionTransformer (Transformer/encoderblock_* layers).'
    )
  return jnp.stack(
    [
      blocks[name]['MultiHeadDotProductAttention_0']['attention_weights'][0]
      for _, name in layers
    ]
  ).astype(jnp.float32)


def fuse_heads(weights: Array, how: str = 'mean') -> Array:
  """Combines the heads axis (-3) by `how`: 'mean', 'max' or 'min'."""
  if how not in HEAD_FUSIONS:
    raise ValueError(f'Unknown head fusion {how!r}; use one of {HEAD_FUSIONS}.')
  return getattr(jnp, how)(weights, axis=-3)


def rollout(weights: Array, head_fusion: str = 'mean') -> Array:
  """Attention rollout `[..., T, T]` of weights `[layers, ..., heads, T, T]`.

  Row i says how much each input token contributes to token i after the
  last layer, counting the residual path as attention to oneself.
  """
  fused = fuse_heads(weights, head_fusion)
  eye = jnp.eye(fused.shape[-1], dtype=fused.dtype)
  with_residual = fused + eye
  with_residual = with_residual / with_residual.sum(-1, keepdims=True)
  result = with_residual[0]
  for layer in with_residual[1:]:
    result = layer @ result
  return result


def patch_grid(model: Any, image_size: Tuple[int, int]) -> Tuple[int, int]:
  """(rows, columns) of the model's patch grid for images of `image_size`."""
  check_supported(model)
  return vit.token_grid(image_size, model.patches, model.conv_stem)


def token_map(matrix: Array, classifier: str, grid: Tuple[int, int]) -> Array:
  """Attention to each patch as a `[..., rows, cols]` image.

  Args:
    matrix: attention or rollout, `[..., T, T]` (query, key).
    classifier: the model's: 'token'/'token_unpooled' use the class token's
      row; otherwise the mean over all query rows.
    grid: the patch grid (rows, columns); T is rows*cols, plus one with a
      class token.
  """
  has_class_token = classifier in ('token', 'token_unpooled')
  num_prefix = 1 if has_class_token else 0
  if matrix.shape[-1] != num_prefix + grid[0] * grid[1]:
    raise ValueError(
      f'Attention over {matrix.shape[-1]} tokens does not match a '
      f'{grid[0]}x{grid[1]} patch grid with {num_prefix} class token(s).'
    )
  rows = matrix[..., 0, :] if has_class_token else matrix.mean(-2)
  patches = rows[..., num_prefix:]
  return patches.reshape(*patches.shape[:-1], *grid)
