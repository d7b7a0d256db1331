"""Vision Transformer (Dosovitskiy et al., 2020) in Flax linen.

Module and parameter names follow Google's `vit_jax`, so a parameter tree of
this model is interchangeable with one of theirs:

  embedding/{kernel,bias}                       patch embedding (a strided conv)
  cls                                           class token (token classifiers)
  Transformer/posembed_input/pos_embedding      learned position embeddings
  Transformer/encoderblock_{i}/LayerNorm_0
  Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/{query,key,value,out}
  Transformer/encoderblock_{i}/LayerNorm_1
  Transformer/encoderblock_{i}/MlpBlock_0/{Dense_0,Dense_1}
  Transformer/encoder_norm
  pre_logits/{kernel,bias}                      only with `representation_size`
  head/{kernel,bias}                            only with `num_classes`
  head/{hidden,out}/{kernel,bias}               instead, with `head_mlp_dim`

With `transformer.scan=True` the blocks run under `nn.scan`, and their
parameters are one module, `Transformer/encoderblock/...` (`SCANNED_BLOCK`),
each leaf stacked over the layers on a new leading axis; files always hold
the per-layer names (`vit_jax.checkpoint.layer_stack` converts).

Hybrid models (R50+ViT-B/16 and friends) add vit_jax's ResNet root
(`conv_root`, `gn_root`, `block{i}/unit{j}/...`) in front of the embedding.

Stochastic depth (`transformer.stochastic_depth`, `DropPath`) drops whole
residual branches per example in training; it adds no parameter.

Mixed precision: `dtype` is the compute dtype of every layer; parameters are
always created in float32, LayerNorm statistics and the attention softmax are
computed in float32, and the logits are returned in float32.
"""

import inspect
from typing import Any, Callable, Optional, Sequence, Tuple, Type

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.errors import ConfigError
from vit_jax.models import heads
from vit_jax.models import resnet

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

CLASSIFIERS = ('token', 'gap', 'unpooled', 'token_unpooled')
POSITION_EMBEDDINGS = ('learned', 'sincos2d', 'none')
# How `MultiHeadSelfAttention` computes softmax(q k^T / sqrt(d)) v.
ATTENTION_KERNELS = ('explicit', 'dot_product_attention')
# The module name of the encoder blocks run under `nn.scan`: one module whose
# parameters are stacked over the layers.
SCANNED_BLOCK = 'encoderblock'


def remat_policies() -> Tuple[str, ...]:
  """The names of the policies in `jax.checkpoint_policies` (e.g.
  'nothing_saveable', 'dots_saveable'), leaving out the functions that
  build a policy from arguments (`save_only_these_names`, ...): a policy
  takes a primitive and its parameters as keywords."""
  names = []
  for name in dir(jax.checkpoint_policies):
    value = getattr(jax.checkpoint_policies, name)
    if name.startswith('_') or not callable(value):
      continue
    parameters = inspect.signature(value).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
      names.append(name)
  return tuple(names)


def remat_policy(name: str) -> Callable[..., bool]:
  """The `jax.checkpoint_policies` policy `name`: what a rematerialised
  block keeps from its forward pass (the rest is recomputed for the
  gradient). A ConfigError names the valid ones."""
  if name not in remat_policies():
    raise ConfigError(
      f'config.model.transformer.remat_policy={name!r} is not a policy of '
      f'jax.checkpoint_policies; choose one of {list(remat_policies())}.'
    )
  return getattr(jax.checkpoint_policies, name)


class IdentityLayer(nn.Module):
  """Returns its input; gives a name (e.g. `pre_logits`) to an activation."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return x


def sincos2d_embedding(
  height: int, width: int, dim: int, temperature: float = 10_000.0
) -> np.ndarray:
  """Fixed 2-D sine-cosine position embeddings, shape `[height * width, dim]`.

  Token `p = r * width + c` (row `r`, column `c`) gets
  `[sin(c * w), cos(c * w), sin(r * w), cos(r * w)]`, each block of width
  `dim // 4`, with frequencies `w_k = temperature ** (-k / (dim // 4 - 1))`
  for `k = 0 .. dim // 4 - 1` (so they span 1 down to 1 / temperature), as in
  big_vision's `posemb_sincos_2d`.

  Args:
    height: number of patch rows.
    width: number of patch columns.
    dim: embedding width; a multiple of 4, at least 8.
    temperature: the longest wavelength, in patches.

  Returns:
    A float32 numpy array (a compile-time constant, never a parameter).
  """
  if dim % 4 or dim < 8:
    raise ValueError(
      f'sincos2d position embeddings need a hidden size that is a multiple '
      f'of 4 and at least 8, got {dim}; use posemb="learned" for this width.'
    )
  quarter = dim // 4
  omega = 1.0 / temperature ** (np.arange(quarter) / (quarter - 1))
  rows, cols = np.mgrid[:height, :width]
  row_angles = rows.reshape(-1, 1) * omega[None, :]
  col_angles = cols.reshape(-1, 1) * omega[None, :]
  return np.concatenate(
    [
      np.sin(col_angles),
      np.cos(col_angles),
      np.sin(row_angles),
      np.cos(row_angles),
    ],
    axis=1,
  ).astype(np.float32)


def fixed_position_table(
  posemb: str, grid: Tuple[int, int], num_prefix: int, dim: int
) -> np.ndarray:
  """What a fixed position embedding adds, `[1, num_prefix + rows * cols,
  dim]`: zeros for the prefix (class) tokens, then `sincos2d_embedding`, or
  zeros throughout for 'none'. As a learned table, it computes the same
  function (how exports give such models to loaders that expect one)."""
  if posemb not in ('sincos2d', 'none'):
    raise ValueError(f'posemb={posemb!r} is not a fixed position embedding.')
  rows, cols = grid
  patches = (
    sincos2d_embedding(rows, cols, dim)
    if posemb == 'sincos2d'
    else np.zeros((rows * cols, dim), np.float32)
  )
  return np.concatenate([np.zeros((num_prefix, dim), np.float32), patches])[
    None
  ]


def token_grid(
  image_size: Tuple[int, int],
  patches: Any,
  conv_stem: Optional[Sequence[int]] = None,
) -> Tuple[int, int]:
  """(rows, columns) of a ViT's token grid for images of `image_size`.

  Each `conv_stem` convolution halves the size (rounding up); the patch
  embedding then divides it by the patch size, dropping a remainder
  ('VALID', vit_jax's) or zero-padding to a whole patch ('SAME').
  """
  rows, cols = image_size
  for _ in conv_stem or ():
    rows, cols = -(-rows // 2), -(-cols // 2)
  ph, pw = patches['size']
  if patches.get('padding', 'VALID') == 'SAME':
    return -(-rows // ph), -(-cols // pw)
  return rows // ph, cols // pw


class PatchEmbedding(nn.Module):
  """A linear map of each non-overlapping `patch` of the image: `nn.Conv`
  with kernel = stride = `patch`, its parameters (`kernel [ph, pw, in,
  features]`, `bias [features]`) and its initialisation, computed as one
  matmul over the flattened patches. XLA's CPU convolution computes the
  kernel gradient of this strided conv slowly, the largest cost of a
  ViT-Ti/16 train step after the matmuls on 2 cores (docs/benchmarks.md,
  "What changed"); the matmul goes through the backend's matmul library.

  Attributes:
    features: output width.
    patch: `(ph, pw)`.
    padding: 'VALID' (drops the rows and columns past the last whole patch)
      or 'SAME' (zero-pads to whole patches, as `nn.Conv` does).
    dtype: compute dtype; parameters stay float32.
  """

  features: int
  patch: Tuple[int, int]
  padding: str = 'VALID'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    ph, pw = self.patch
    batch, height, width, channels = x.shape
    kernel = self.param(
      'kernel',
      nn.initializers.lecun_normal(),
      (ph, pw, channels, self.features),
      jnp.float32,
    )
    bias = self.param(
      'bias', nn.initializers.zeros, (self.features,), jnp.float32
    )
    if self.padding == 'SAME':
      pad_h, pad_w = -height % ph, -width % pw
      x = jnp.pad(
        x,
        (
          (0, 0),
          (pad_h // 2, pad_h - pad_h // 2),
          (pad_w // 2, pad_w - pad_w // 2),
          (0, 0),
        ),
      )
    elif self.padding != 'VALID':
      raise ValueError(f'padding={self.padding!r}; use "VALID" or "SAME".')
    rows, cols = x.shape[1] // ph, x.shape[2] // pw
    x = x[:, : rows * ph, : cols * pw].astype(self.dtype)
    patches = (
      x.reshape(batch, rows, ph, cols, pw, channels)
      .transpose(0, 1, 3, 2, 4, 5)
      .reshape(batch, rows, cols, ph * pw * channels)
    )
    flat_kernel = kernel.reshape(ph * pw * channels, self.features)
    return patches @ flat_kernel.astype(self.dtype) + bias.astype(self.dtype)


class AddPositionEmbs(nn.Module):
  """Adds learned position embeddings (`pos_embedding`, `[1, seq, dim]`).

  Attributes:
    posemb_init: initializer of the embedding table.
  """

  posemb_init: Initializer = nn.initializers.normal(stddev=0.02)  # as BERT.

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    if inputs.ndim != 3:
      raise ValueError(
        f'AddPositionEmbs expects [batch, seq, dim], got shape {inputs.shape}'
      )
    shape = (1, inputs.shape[1], inputs.shape[2])
    table = self.param('pos_embedding', self.posemb_init, shape, jnp.float32)
    return inputs + table.astype(inputs.dtype)


def as_rows(x: Array) -> Array:
  """`x` as a matrix `[every leading position, features]`.

  The Dense layers of the encoder run on rows: their weight gradients are
  then one matmul over the rows, which XLA's CPU backend hands to its
  matmul library as it is, while `[batch, tokens, features]` activations
  are first copied to another layout (docs/benchmarks.md, "Model
  formulations").
  """
  return x.reshape(-1, x.shape[-1])


class MlpBlock(nn.Module):
  """Transformer feed-forward block: Dense → GELU → Dropout → Dense → Dropout,
  applied to every position of `inputs` (`[..., features]`), computed on
  their rows (`as_rows`).

  Attributes:
    mlp_dim: hidden width.
    dtype: compute dtype.
    out_dim: output width (default: the input width).
    dropout_rate: dropout after each Dense.
    kernel_init: initializer of both kernels.
    bias_init: initializer of both biases.
    approximate_gelu: tanh-approximated GELU (Google's checkpoints were
      trained with it) instead of the exact erf form (timm, transformers).
  """

  mlp_dim: int
  dtype: Dtype = jnp.float32
  out_dim: Optional[int] = None
  dropout_rate: float = 0.1
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  bias_init: Initializer = nn.initializers.normal(stddev=1e-6)
  approximate_gelu: bool = True

  @nn.compact
  def __call__(self, inputs: Array, *, deterministic: bool) -> Array:
    out_dim = inputs.shape[-1] if self.out_dim is None else self.out_dim
    dense = lambda features: nn.Dense(  # pylint: disable=g-long-lambda
      features,
      dtype=self.dtype,
      kernel_init=self.kernel_init,
      bias_init=self.bias_init,
    )
    x = dense(self.mlp_dim)(as_rows(inputs))
    x = nn.gelu(x, approximate=self.approximate_gelu)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    x = dense(out_dim)(x)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    return x.reshape(inputs.shape[:-1] + (out_dim,))


def drop_path_rates(rate: float, num_layers: int) -> np.ndarray:
  """The stochastic-depth rate of each of `num_layers` blocks: rising
  linearly from 0 at the first block to `rate` at the last, block i of L
  at `rate * i / (L - 1)` (the rule of Huang et al., 2016, as timm's and
  DeiT's `drop_path_rate` apply it); a single block gets 0."""
  return np.linspace(0.0, rate, num_layers)


class DropPath(nn.Module):
  """Stochastic depth (Huang et al., "Deep networks with stochastic depth",
  2016) on a residual branch `x` (`[batch, ...]`): each example's branch is
  dropped (zeroed) with probability `rate` and otherwise kept and scaled by
  1 / (1 - rate), so its expectation is the branch itself; the identity
  when `deterministic`. The masks come from the 'dropout' rng stream, so
  the train step's dropout key drives them. No parameters.

  `rate` is an argument of the call, not an attribute, so that a scanned
  encoder can give each layer its own (traced) rate.
  """

  @nn.compact
  def __call__(self, x: Array, rate: Any, *, deterministic: bool) -> Array:
    if deterministic:
      return x
    keep = 1.0 - jnp.asarray(rate, jnp.float32)
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    kept = jax.random.bernoulli(self.make_rng('dropout'), keep, shape)
    return x * jnp.where(kept, 1.0 / keep, 0.0).astype(x.dtype)


class MultiHeadSelfAttention(nn.Module):
  """Multi-head self-attention with the parameters of Flax's (and vit_jax's)
  `MultiHeadDotProductAttention`:

    {query,key,value}/kernel [width, heads, head_dim], .../bias [heads, head_dim]
    out/kernel [heads, head_dim, width], out/bias [width]

  The four projections run on the tokens' rows (`as_rows`). The explicit
  attention runs head-major (`[batch, heads, tokens, head_dim]`), so neither
  of its matmuls needs a transpose; `jax.nn.dot_product_attention` takes
  the projections token-major as they come (`[batch, tokens, heads,
  head_dim]`).

  Attributes:
    num_heads: attention heads; must divide the width.
    dtype: compute dtype; the softmax is float32.
    dropout_rate: dropout on the attention weights.
    kernel_init: initialiser of the four kernels.
    sow_weights: record the softmaxed weights `[batch, heads, query, key]`
      in the `intermediates` collection as `attention_weights`.
    implementation: 'explicit' (einsums and a softmax) or
      'dot_product_attention' (`jax.nn.dot_product_attention`: XLA's, or
      cuDNN's fused kernel on a GPU where it applies). The latter has no
      weights to drop out or sow: it cannot train with `dropout_rate` > 0,
      and `sow_weights` computes the explicit attention.
  """

  num_heads: int
  dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  sow_weights: bool = False
  implementation: str = 'explicit'

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(
        f'Width {width} is not divisible by {self.num_heads} attention heads.'
      )
    fused = self._fused(deterministic)
    batch, tokens = x.shape[:2]
    heads = (self.num_heads, width // self.num_heads)
    rows = as_rows(x.astype(self.dtype))
    query, key, value = (
      nn.DenseGeneral(
        heads, dtype=self.dtype, kernel_init=self.kernel_init, name=name
      )(rows).reshape(batch, tokens, *heads)
      for name in ('query', 'key', 'value')
    )
    if fused:
      out = jax.nn.dot_product_attention(query, key, value)
    else:
      out = self._attention(
        query.swapaxes(1, 2),
        key.swapaxes(1, 2),
        value.swapaxes(1, 2),
        deterministic,
      ).swapaxes(1, 2)
    out = nn.DenseGeneral(
      width,
      axis=(-2, -1),
      dtype=self.dtype,
      kernel_init=self.kernel_init,
      name='out',
    )(out.reshape(batch * tokens, *heads))
    return out.reshape(batch, tokens, width)

  def _fused(self, deterministic: bool) -> bool:
    """Whether `jax.nn.dot_product_attention` computes the attention: when
    configured, unless the weights are sown; a ConfigError when it would
    have to drop them out."""
    if self.implementation not in ATTENTION_KERNELS:
      raise ConfigError(
        f'config.model.transformer.attention={self.implementation!r}; '
        f'choose one of {ATTENTION_KERNELS}.'
      )
    if self.implementation == 'explicit' or self.sow_weights:
      return False
    if self.dropout_rate > 0 and not deterministic:
      raise ConfigError(
        'config.model.transformer.attention="dot_product_attention" cannot '
        'drop out attention weights, and config.model.transformer.'
        f'attention_dropout_rate={self.dropout_rate} trains with dropout; '
        'set attention_dropout_rate=0 or attention="explicit".'
      )
    return True

  def _attention(
    self, query: Array, key: Array, value: Array, deterministic: bool
  ) -> Array:
    """softmax(q k^T / sqrt(d)) v over `[batch, heads, tokens, head_dim]`
    (head-major: both matmuls need no transpose), the weights dropped out
    and/or sown."""
    query = query * jnp.asarray(query.shape[-1] ** -0.5, query.dtype)
    logits = jnp.einsum('bhqd,bhkd->bhqk', query, key)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    if self.sow_weights:
      self.sow('intermediates', 'attention_weights', weights)
    weights = nn.Dropout(rate=self.dropout_rate)(
      weights.astype(self.dtype), deterministic=deterministic
    )
    return jnp.einsum('bhqk,bhkd->bhqd', weights, value)


class Encoder1DBlock(nn.Module):
  """Pre-norm Transformer layer: x + Attn(LN(x)), then x + MLP(LN(x)).

  Attributes:
    mlp_dim: hidden width of the MLP.
    num_heads: number of attention heads.
    dtype: compute dtype.
    dropout_rate: dropout on the attention and MLP outputs.
    attention_dropout_rate: dropout on the attention weights.
    sow_attention_weights: record the softmaxed attention weights,
      `[batch, heads, query, key]`, in the `intermediates` collection under
      `MultiHeadDotProductAttention_0/attention_weights`.
    approximate_gelu: see `MlpBlock`.
    layernorm_epsilon: epsilon of both LayerNorms (1e-6 as Flax and timm;
      Hugging Face transformers' ViT uses 1e-12).
    attention: how the attention is computed, one of `ATTENTION_KERNELS`
      (see `MultiHeadSelfAttention.implementation`).

  The call's `drop_rate` is this block's stochastic-depth rate (a float, or
  a traced scalar under `nn.scan`): in training each residual branch, the
  attention's and the MLP's, goes through its own `DropPath` (`DropPath_0`,
  `DropPath_1`). None (the default) builds the block without them.
  """

  mlp_dim: int
  num_heads: int
  dtype: Dtype = jnp.float32
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  sow_attention_weights: bool = False
  approximate_gelu: bool = True
  layernorm_epsilon: float = 1e-6
  attention: str = 'explicit'

  # `deterministic` may be positional: `nn.remat` needs it static, and
  # static arguments are positional (`static_argnums`).
  @nn.compact
  def __call__(
    self, inputs: Array, deterministic: bool, drop_rate: Any = None
  ) -> Array:
    if inputs.ndim != 3:
      raise ValueError(
        f'Encoder1DBlock expects [batch, seq, dim], got {inputs.shape}'
      )
    x = nn.LayerNorm(epsilon=self.layernorm_epsilon, dtype=self.dtype)(inputs)
    x = MultiHeadSelfAttention(
      num_heads=self.num_heads,
      dtype=self.dtype,
      dropout_rate=self.attention_dropout_rate,
      sow_weights=self.sow_attention_weights,
      implementation=self.attention,
      name='MultiHeadDotProductAttention_0',
    )(x, deterministic=deterministic)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    x = self._drop_path(x, drop_rate, deterministic) + inputs

    y = nn.LayerNorm(epsilon=self.layernorm_epsilon, dtype=self.dtype)(x)
    y = MlpBlock(
      mlp_dim=self.mlp_dim,
      dtype=self.dtype,
      dropout_rate=self.dropout_rate,
      approximate_gelu=self.approximate_gelu,
      name='MlpBlock_0',
    )(y, deterministic=deterministic)
    return x + self._drop_path(y, drop_rate, deterministic)

  def _drop_path(
    self, branch: Array, drop_rate: Any, deterministic: bool
  ) -> Array:
    """`branch` through a new `DropPath`, or as it is without a rate."""
    if drop_rate is None:
      return branch
    return DropPath()(branch, drop_rate, deterministic=deterministic)


class Encoder(nn.Module):
  """Position embeddings, a stack of `Encoder1DBlock`s and a final LayerNorm.

  Attributes:
    num_layers: number of Transformer layers.
    mlp_dim: hidden width of each MLP.
    num_heads: attention heads per layer.
    dropout_rate: dropout rate.
    attention_dropout_rate: dropout on attention weights.
    posemb: 'learned' (trainable table, vit_jax's), 'sincos2d' (fixed, no
      parameter) or 'none'.
    posemb_grid: (rows, columns) of the patch grid; needed by 'sincos2d'.
      Tokens in front of the grid (a class token) get a zero embedding.
    dtype: compute dtype.
    sow_attention_weights: see `Encoder1DBlock`.
    approximate_gelu: see `MlpBlock`.
    layernorm_epsilon: epsilon of every LayerNorm, see `Encoder1DBlock`.
    remat: rematerialise each block (`nn.remat`): its activations are
      recomputed for the gradient instead of kept, trading compute for
      memory. The outputs and gradients are unchanged.
    remat_policy: the name of the `jax.checkpoint_policies` policy saying
      what a rematerialised block keeps (see `remat_policies()`).
    scan: run the blocks as one `nn.scan` over the layers (compiled once,
      not `num_layers` times). Their parameters are then stacked over a
      leading layer axis under `Transformer/encoderblock` (`SCANNED_BLOCK`)
      instead of `Transformer/encoderblock_{i}`; see
      `vit_jax.checkpoint.layer_stack`.
    attention: 'explicit' or 'dot_product_attention', see
      `MultiHeadSelfAttention.implementation`.
    stochastic_depth: the drop-path rate of the last block; block i of L
      drops its residual branches at `stochastic_depth * i / (L - 1)`
      (`drop_path_rates`), in training only. 0: off.
  """

  num_layers: int
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  posemb: str = 'learned'
  posemb_grid: Optional[Tuple[int, int]] = None
  dtype: Dtype = jnp.float32
  sow_attention_weights: bool = False
  approximate_gelu: bool = True
  layernorm_epsilon: float = 1e-6
  remat: bool = False
  remat_policy: str = 'nothing_saveable'
  scan: bool = False
  attention: str = 'explicit'
  stochastic_depth: float = 0.0

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    if x.ndim != 3:
      raise ValueError(f'Encoder expects [batch, seq, dim], got {x.shape}')
    if self.posemb == 'learned':
      x = AddPositionEmbs(name='posembed_input')(x)
    elif self.posemb == 'sincos2d':
      x = x + self._sincos2d_table(x.shape[1], x.shape[2]).astype(x.dtype)
    elif self.posemb != 'none':
      raise ValueError(
        f'Unknown posemb={self.posemb!r}; expected one of '
        f'{POSITION_EMBEDDINGS}.'
      )
    if self.posemb != 'none':
      x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)

    x = self._blocks(x, deterministic=not train)
    return nn.LayerNorm(
      epsilon=self.layernorm_epsilon, dtype=self.dtype, name='encoder_norm'
    )(x)

  def _blocks(self, x: Array, deterministic: bool) -> Array:
    """The `num_layers` blocks, one after the other or scanned, each
    rematerialised with `remat`; each given its stochastic-depth rate when
    `stochastic_depth` is on (scanned: as the scan's per-layer input)."""
    rates = drop_path_rates(self.stochastic_depth, self.num_layers)
    block = Encoder1DBlock
    policy = remat_policy(self.remat_policy)
    if self.remat:
      # 0 is the module, 1 the inputs. Inside a scan, common subexpression
      # elimination cannot defeat the rematerialisation, so XLA may keep it.
      block = nn.remat(
        Encoder1DBlock,
        static_argnums=(2,),
        policy=policy,
        prevent_cse=not self.scan,
      )
    options = dict(
      mlp_dim=self.mlp_dim,
      num_heads=self.num_heads,
      dtype=self.dtype,
      dropout_rate=self.dropout_rate,
      attention_dropout_rate=self.attention_dropout_rate,
      sow_attention_weights=self.sow_attention_weights,
      approximate_gelu=self.approximate_gelu,
      layernorm_epsilon=self.layernorm_epsilon,
      attention=self.attention,
    )
    if not self.scan:
      for layer in range(self.num_layers):
        rate = float(rates[layer]) if rates[layer] > 0 else None
        x = block(name=f'encoderblock_{layer}', **options)(
          x, deterministic, rate
        )
      return x

    def layer(
      module: nn.Module, carry: Array, rate: Optional[Array]
    ) -> Tuple[Array, None]:
      return module(carry, deterministic, rate), None

    # Each layer gets its own parameters (and sown weights) along axis 0 of
    # the stacked arrays, its own initialisation and dropout rngs, and its
    # own stochastic-depth rate (None: no DropPath, as without the option).
    x, _ = nn.scan(
      layer,
      variable_axes={'params': 0, 'intermediates': 0},
      split_rngs={'params': True, 'dropout': True},
      in_axes=0,
      length=self.num_layers,
    )(
      block(name=SCANNED_BLOCK, **options),
      x,
      jnp.asarray(rates, jnp.float32) if self.stochastic_depth else None,
    )
    return x

  def _sincos2d_table(self, seq_len: int, dim: int) -> Array:
    """The fixed table for `seq_len` tokens: zeros for prefix tokens."""
    if self.posemb_grid is None:
      raise ValueError('posemb="sincos2d" needs posemb_grid=(rows, columns).')
    rows, cols = self.posemb_grid
    num_prefix = seq_len - rows * cols
    if num_prefix < 0:
      raise ValueError(
        f'Sequence of {seq_len} tokens is shorter than the {rows}x{cols} '
        'patch grid given in posemb_grid.'
      )
    return jnp.asarray(
      fixed_position_table('sincos2d', (rows, cols), num_prefix, dim)
    )


class VisionTransformer(nn.Module):
  """Vision Transformer classifier (optionally with a ResNet root: hybrid).

  Attributes:
    num_classes: width of the `head`; 0 or None leaves the head out and returns
      the (pre-logits) representation.
    patches: {'size': (ph, pw)}: patch size of the `embedding` conv, and
      optionally 'padding': 'VALID' (default, vit_jax's) or 'SAME' (zero-pads
      the grid to whole patches, e.g. a 7x7 stem output to 4x4 patches of 2).
    transformer: keyword arguments of `Encoder` (num_layers, mlp_dim,
      num_heads, dropout_rate, attention_dropout_rate; optionally
      stochastic_depth, remat, remat_policy, scan and attention); None
      stops after the patch embedding.
    hidden_size: token width.
    resnet: {'num_layers': (...), 'width_factor': w} for a hybrid model.
    conv_stem: widths of 3x3 stride-2 convolutions (each followed by a
      LayerNorm over channels and a ReLU) in front of the patch embedding:
      the convolutional stem of Xiao et al., "Early convolutions help
      transformers see better" (2021). With patch size 1 the embedding is
      the stem's final 1x1 projection.
    representation_size: width of a tanh `pre_logits` layer before the head.
    classifier: 'token' (class token, vit_jax's default), 'gap' (mean over
      tokens), 'unpooled' (every patch token) or 'token_unpooled' (class token
      plus every patch token, unpooled).
    head_bias_init: constant initial value of the head bias.
    head_mlp_dim: if set, the head is an `MlpHead` of this hidden width
      instead of vit_jax's single Dense.
    head_dropout_rate: dropout inside an `MlpHead`.
    encoder: the Encoder class (swappable for experiments).
    model_name: the registry name; informational.
    posemb: position embedding kind, see `Encoder`.
    dtype: compute dtype (e.g. jnp.bfloat16); parameters stay float32.
    sow_attention_weights: record every layer's attention weights in the
      `intermediates` collection (pass `mutable=['intermediates']` to apply).
    approximate_gelu: tanh GELU (Google's weights) or exact (timm, HF).
    layernorm_epsilon: epsilon of the encoder's LayerNorms (HF uses 1e-12).
  """

  num_classes: Optional[int]
  patches: Any
  transformer: Any
  hidden_size: int
  resnet: Optional[Any] = None
  conv_stem: Optional[Sequence[int]] = None
  representation_size: Optional[int] = None
  classifier: str = 'token'
  head_bias_init: float = 0.0
  head_mlp_dim: Optional[int] = None
  head_dropout_rate: float = 0.0
  encoder: Type[nn.Module] = Encoder
  model_name: Optional[str] = None
  posemb: str = 'learned'
  dtype: Dtype = jnp.float32
  sow_attention_weights: bool = False
  approximate_gelu: bool = True
  layernorm_epsilon: float = 1e-6

  def _check_tokens(self, image_size: Sequence[int], grid: Sequence[int]):
    """A ConfigError for images too small to give one token."""
    if 0 not in grid:
      return
    before = []
    if self.resnet is not None:
      before.append('the ResNet root')
    if self.conv_stem:
      before.append(f'{len(self.conv_stem)} stride-2 convolutions')
    through = f' through {" and ".join(before)}' if before else ''
    raise ConfigError(
      f'Images of {image_size[0]}x{image_size[1]} pixels give a '
      f'{grid[0]}x{grid[1]} token grid{through} with '
      f'{"x".join(map(str, self.patches["size"]))} patches; feed larger '
      'images (config.pp.crop) or use smaller patches '
      '(config.model.patches.size).'
    )

  @nn.compact
  def __call__(self, inputs: Array, *, train: bool) -> Array:
    if self.classifier not in CLASSIFIERS:
      raise ValueError(
        f'Invalid classifier={self.classifier!r}; expected one of '
        f'{CLASSIFIERS}.'
      )
    if inputs.ndim != 4:
      raise ValueError(
        f'VisionTransformer expects images [batch, height, width, channels],'
        f' got shape {inputs.shape}.'
      )
    x = inputs
    if self.resnet is not None:
      x = self._resnet_root(x)
    if self.conv_stem:
      x = self._conv_stem(x)

    x = PatchEmbedding(
      self.hidden_size,
      tuple(self.patches['size']),
      padding=self.patches.get('padding', 'VALID'),
      dtype=self.dtype,
      name='embedding',
    )(x)
    self._check_tokens(inputs.shape[1:3], x.shape[1:3])

    if self.transformer is not None:
      n, h, w, c = x.shape
      x = jnp.reshape(x, [n, h * w, c])
      if self.classifier in ('token', 'token_unpooled'):
        cls = self.param('cls', nn.initializers.zeros, (1, 1, c), jnp.float32)
        x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), [n, 1, 1]), x], 1)
      x = self.encoder(
        name='Transformer',
        posemb=self.posemb,
        posemb_grid=(h, w),
        dtype=self.dtype,
        sow_attention_weights=self.sow_attention_weights,
        approximate_gelu=self.approximate_gelu,
        layernorm_epsilon=self.layernorm_epsilon,
        **self.transformer,
      )(x, train=train)

    if self.classifier == 'token':
      x = x[:, 0]
    elif self.classifier == 'gap':
      x = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))

    if self.representation_size is not None:
      x = nn.Dense(
        self.representation_size, dtype=self.dtype, name='pre_logits'
      )(x)
      x = nn.tanh(x)
    else:
      x = IdentityLayer(name='pre_logits')(x)

    return heads.classifier_head(
      x,
      self.num_classes,
      self.head_mlp_dim,
      self.head_dropout_rate,
      self.head_bias_init,
      self.dtype,
      train,
    )

  def _conv_stem(self, x: Array) -> Array:
    """3x3 stride-2 convolutions, each halving the grid (rounding up)."""
    for i, width in enumerate(self.conv_stem):
      x = nn.Conv(
        width,
        (3, 3),
        strides=(2, 2),
        padding='SAME',
        dtype=self.dtype,
        name=f'stem_conv{i}',
      )(x)
      x = nn.LayerNorm(dtype=self.dtype, name=f'stem_norm{i}')(x)
      x = nn.relu(x)
    return x

  def _resnet_root(self, x: Array) -> Array:
    """vit_jax's hybrid root: StdConv 7x7/2, GroupNorm, max-pool, stages."""
    width = int(64 * self.resnet['width_factor'])
    x = resnet.StdConv(
      features=width,
      kernel_size=(7, 7),
      strides=(2, 2),
      dtype=self.dtype,
      name='conv_root',
    )(x)
    x = resnet.GroupNorm(dtype=self.dtype, name='gn_root')(x)
    x = nn.relu(x)
    x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding='SAME')
    stage_sizes: Sequence[int] = tuple(self.resnet['num_layers'])
    for i, block_size in enumerate(stage_sizes):
      x = resnet.ResNetStage(
        block_size=block_size,
        nout=width * 2**i,
        first_stride=(1, 1) if i == 0 else (2, 2),
        dtype=self.dtype,
        name=f'block{i + 1}',
      )(x)
    return x
