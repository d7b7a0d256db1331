"""Swin Transformer (Liu et al., 2021) in Flax linen: a hierarchical ViT.

Attention runs inside non-overlapping windows of `window_size`² tokens, with
a learned bias per relative position; every second block shifts the windows
by half a window (cyclic roll, attention masked between tokens that the roll
brought together from different image regions), and each stage after the
first halves the grid by merging 2x2 patches. Parameter tree:

  embedding/{kernel,bias}, embedding_norm                   4x4 patches
  stage_{i}/downsample/{norm,reduction}                     i > 0: patch merging
  stage_{i}/block_{j}/LayerNorm_0
  stage_{i}/block_{j}/attention/{query,key,value,out}
  stage_{i}/block_{j}/attention/relative_position_bias_table
  stage_{i}/block_{j}/LayerNorm_1
  stage_{i}/block_{j}/MlpBlock_0/{Dense_0,Dense_1}
  encoder_norm, head

Stochastic depth (`stochastic_depth`) adds no parameter.

The attention projections have the ViT's layout and names (so fine-tuning
injection targets them alike); `vit_jax.checkpoint.swin_names` maps timm's
Swin weights onto this tree. The computation follows timm's
`SwinTransformer` (exact GELU, LayerNorm epsilon 1e-5, mask value -100),
so its published weights give its logits here.
"""

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import heads
from vit_jax.models import vit

Array = jax.Array
Dtype = Any
# Added to the attention logits of token pairs that a shifted window
# brings together from different regions (timm's and the paper's value).
MASK_VALUE = -100.0


def window_partition(x: Array, window: int) -> Array:
  """`[B, H, W, C]` → `[B * (H/w) * (W/w), w * w, C]`, windows in row-major
  order, tokens row-major inside each window."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(
  windows: Array, window: int, height: int, width: int
) -> Array:
  """Inverse of `window_partition`: windows back to `[B, H, W, C]`."""
  c = windows.shape[-1]
  x = windows.reshape(-1, height // window, width // window, window, window, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, height, width, c)


def relative_position_index(window: int) -> np.ndarray:
  """`[w², w²]`: for query token i and key token j of a window, the row of
  the bias table for their offset (dy, dx), each in [-(w-1), w-1]:
  `(dy + w - 1) * (2w - 1) + (dx + w - 1)`."""
  rows, cols = np.meshgrid(np.arange(window), np.arange(window), indexing='ij')
  rows, cols = rows.reshape(-1), cols.reshape(-1)
  dy = rows[:, None] - rows[None, :] + window - 1
  dx = cols[:, None] - cols[None, :] + window - 1
  return dy * (2 * window - 1) + dx


def shifted_window_mask(
  height: int, width: int, window: int, shift: int
) -> np.ndarray:
  """`[num_windows, w², w²]`: 0 where query and key come from the same region
  of the image before the cyclic shift, `MASK_VALUE` elsewhere.

  Rolling the grid by `-shift` moves the last `shift` rows and columns to the
  start; windows on the seams then hold tokens from up to four regions, which
  must not attend to each other.
  """
  region = np.zeros((1, height, width, 1), np.float32)
  bands = lambda size: (
    slice(0, size - window),
    slice(
      size - window,  # pylint: disable=g-long-lambda
      size - shift,
    ),
    slice(size - shift, size),
  )
  for index, (rows, cols) in enumerate(
    (r, c) for r in bands(height) for c in bands(width)
  ):
    region[:, rows, cols, :] = index
  labels = window_partition(region, window)[..., 0]  # [windows, w²]
  same = labels[:, :, None] == labels[:, None, :]
  return np.where(same, 0.0, MASK_VALUE).astype(np.float32)


class WindowAttention(nn.Module):
  """Multi-head self-attention inside windows, with relative position bias.

  Attributes:
    num_heads: attention heads.
    window: window side in tokens.
    dtype: compute dtype (softmax in float32).
    attention_dropout_rate: dropout on the attention weights.
  """

  num_heads: int
  window: int
  dtype: Dtype = jnp.float32
  attention_dropout_rate: float = 0.0

  @nn.compact
  def __call__(
    self, x: Array, mask: Optional[Array], *, deterministic: bool
  ) -> Array:
    """`x`: `[B * windows, w², C]`; `mask`: `[windows, w², w²]` or None."""
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(
        f'Width {width} is not divisible by {self.num_heads} heads.'
      )
    head_dim = width // self.num_heads
    project = functools.partial(
      nn.DenseGeneral, features=(self.num_heads, head_dim), dtype=self.dtype
    )
    query = project(name='query')(x) * head_dim**-0.5
    key, value = project(name='key')(x), project(name='value')(x)
    table = self.param(
      'relative_position_bias_table',
      nn.initializers.truncated_normal(0.02),
      ((2 * self.window - 1) ** 2, self.num_heads),
    )
    bias = table[relative_position_index(self.window)]  # [w², w², heads]
    logits = jnp.einsum(
      'bqhd,bkhd->bhqk', query, key, preferred_element_type=jnp.float32
    )
    logits = logits + bias.transpose(2, 0, 1)[None]
    if mask is not None:
      windows = mask.shape[0]
      logits = (
        logits.reshape(-1, windows, *logits.shape[1:]) + mask[None, :, None]
      )
      logits = logits.reshape(-1, *logits.shape[2:])
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    weights = nn.Dropout(rate=self.attention_dropout_rate)(
      weights, deterministic=deterministic
    )
    out = jnp.einsum('bhqk,bkhd->bqhd', weights, value)
    return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, name='out')(
      out
    )


class SwinBlock(nn.Module):
  """x + WindowAttention(LN(x)) over (shifted) windows, then x + MLP(LN(x)).

  Attributes:
    num_heads: attention heads.
    window: window side; clamped to the grid when the grid is smaller (then
      there is one window and no shift, as in the paper's last stage at 224).
    shifted: shift the windows by half a window.
    mlp_ratio: MLP width over the token width.
    dtype, dropout_rate, attention_dropout_rate, layernorm_epsilon: as named.
    drop_rate: stochastic depth of both residual branches (`vit.DropPath`,
      training only); 0: none.
  """

  num_heads: int
  window: int
  shifted: bool
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  layernorm_epsilon: float = 1e-5
  drop_rate: float = 0.0

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    b, h, w, c = x.shape
    window = min(self.window, h, w)
    shift = window // 2 if self.shifted and min(h, w) > self.window else 0
    if h % window or w % window:
      raise ValueError(
        f'A {h}x{w} token grid does not split into {window}x{window} '
        'windows; choose an image size whose grid at every stage is a '
        'multiple of the window (e.g. 224 with patch 4 and window 7).'
      )
    norm = functools.partial(
      nn.LayerNorm, epsilon=self.layernorm_epsilon, dtype=self.dtype
    )
    y = norm()(x)
    if shift:
      y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
    mask = (
      jnp.asarray(shifted_window_mask(h, w, window, shift)) if shift else None
    )
    y = WindowAttention(
      self.num_heads,
      window,
      dtype=self.dtype,
      attention_dropout_rate=self.attention_dropout_rate,
      name='attention',
    )(window_partition(y, window), mask, deterministic=deterministic)
    y = window_reverse(y, window, h, w)
    if shift:
      y = jnp.roll(y, (shift, shift), axis=(1, 2))
    y = nn.Dropout(rate=self.dropout_rate)(y, deterministic=deterministic)
    x = x + self._drop_path(y, deterministic)
    y = vit.MlpBlock(
      mlp_dim=int(c * self.mlp_ratio),
      dtype=self.dtype,
      dropout_rate=self.dropout_rate,
      approximate_gelu=False,
      kernel_init=nn.initializers.truncated_normal(0.02),
      bias_init=nn.initializers.zeros,
    )(norm()(x), deterministic=deterministic)
    return (x + self._drop_path(y, deterministic)).reshape(b, h, w, c)

  def _drop_path(self, branch: Array, deterministic: bool) -> Array:
    """`branch` through a new `vit.DropPath` at `drop_rate`, if above 0."""
    if not self.drop_rate:
      return branch
    return vit.DropPath()(branch, self.drop_rate, deterministic=deterministic)


class PatchMerging(nn.Module):
  """Halves the grid: each 2x2 group of tokens → one token of 2C.

  The four tokens are concatenated in timm's order, (0,0), (1,0), (0,1),
  (1,1) as (row, column) offsets, then normalised and projected.
  """

  dtype: Dtype = jnp.float32
  layernorm_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    if h % 2 or w % 2:
      raise ValueError(f'Patch merging needs an even grid, got {h}x{w}.')
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5)
    x = x.reshape(b, h // 2, w // 2, 4 * c)
    x = nn.LayerNorm(
      epsilon=self.layernorm_epsilon, dtype=self.dtype, name='norm'
    )(x)
    return nn.Dense(
      2 * c,
      use_bias=False,
      dtype=self.dtype,
      kernel_init=nn.initializers.truncated_normal(0.02),
      name='reduction',
    )(x)


class SwinStage(nn.Module):
  """Patch merging (every stage but the first), then `depth` blocks that
  alternate plain and shifted windows; block j drops its branches at
  `drop_rates[j]` (none if empty)."""

  depth: int
  num_heads: int
  window: int
  downsample: bool
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  layernorm_epsilon: float = 1e-5
  drop_rates: Sequence[float] = ()

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    if self.downsample:
      x = PatchMerging(
        dtype=self.dtype,
        layernorm_epsilon=self.layernorm_epsilon,
        name='downsample',
      )(x)
    for block in range(self.depth):
      x = SwinBlock(
        self.num_heads,
        self.window,
        shifted=block % 2 == 1,
        mlp_ratio=self.mlp_ratio,
        dtype=self.dtype,
        dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        layernorm_epsilon=self.layernorm_epsilon,
        drop_rate=float(self.drop_rates[block]) if self.drop_rates else 0.0,
        name=f'block_{block}',
      )(x, deterministic=deterministic)
    return x


class SwinTransformer(nn.Module):
  """Swin Transformer classifier.

  Attributes:
    num_classes: width of the head; 0 or None returns pooled features.
    patch_size: side of the square patches of the embedding.
    embed_dim: token width of the first stage (doubled by every merge).
    depths: blocks per stage.
    num_heads: attention heads per stage.
    window_size: window side in tokens.
    mlp_ratio: MLP width over the token width.
    dropout_rate: dropout after the attention and MLP.
    attention_dropout_rate: dropout on the attention weights.
    layernorm_epsilon: of every LayerNorm (timm: 1e-5).
    stochastic_depth: the drop-path rate of the last block, rising
      linearly from 0 over the blocks of all stages (`vit.drop_path_rates`,
      timm's `drop_path_rate`); 0: off.
    head_mlp_dim, head_dropout_rate, head_bias_init: as in VisionTransformer.
    model_name: the registry name; informational.
    dtype: compute dtype; parameters stay float32, logits are float32.
  """

  num_classes: Optional[int]
  patch_size: int = 4
  embed_dim: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int = 7
  mlp_ratio: float = 4.0
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  layernorm_epsilon: float = 1e-5
  stochastic_depth: float = 0.0
  head_mlp_dim: Optional[int] = None
  head_dropout_rate: float = 0.0
  head_bias_init: float = 0.0
  model_name: Optional[str] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: Array, *, train: bool) -> Array:
    if inputs.ndim != 4:
      raise ValueError(
        f'SwinTransformer expects images [batch, height, '
        f'width, channels], got shape {inputs.shape}.'
      )
    if len(self.depths) != len(self.num_heads):
      raise ValueError(
        f'depths {tuple(self.depths)} and num_heads '
        f'{tuple(self.num_heads)} must have one entry per '
        'stage.'
      )
    patch = (self.patch_size, self.patch_size)
    x = vit.PatchEmbedding(
      self.embed_dim, patch, dtype=self.dtype, name='embedding'
    )(inputs)
    x = nn.LayerNorm(
      epsilon=self.layernorm_epsilon, dtype=self.dtype, name='embedding_norm'
    )(x)
    rates = vit.drop_path_rates(self.stochastic_depth, sum(self.depths))
    starts = np.cumsum([0, *self.depths])
    for stage, (depth, head_count) in enumerate(
      zip(self.depths, self.num_heads)
    ):
      x = SwinStage(
        depth,
        head_count,
        self.window_size,
        downsample=stage > 0,
        mlp_ratio=self.mlp_ratio,
        dtype=self.dtype,
        dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        layernorm_epsilon=self.layernorm_epsilon,
        drop_rates=tuple(
          float(r) for r in rates[starts[stage] : starts[stage] + depth]
        ),
        name=f'stage_{stage}',
      )(x, deterministic=not train)
    x = nn.LayerNorm(
      epsilon=self.layernorm_epsilon, dtype=self.dtype, name='encoder_norm'
    )(x)
    x = jnp.mean(x, axis=(1, 2))
    return heads.classifier_head(
      x,
      self.num_classes,
      self.head_mlp_dim,
      self.head_dropout_rate,
      self.head_bias_init,
      self.dtype,
      train,
    )
