"""BiT-style ResNet: the root of hybrid R+ViT models, and a classifier.

Convolutions use weight standardisation and every normalisation is a
GroupNorm (Kolesnikov et al., "Big Transfer"), as vit_jax's hybrids do; the
parameter names (`conv1`, `gn1`, ..., `conv_proj`, `gn_proj`, `unit{j}`) are
vit_jax's. `ResNet` puts the same root and stages (`conv_root`, `gn_root`,
`block{i}`) under a classification head, as a convolutional baseline:

  conv_root/kernel, gn_root/{scale,bias}
  block{i}/unit{j}/{conv1,conv2,conv3,conv_proj}/kernel
  block{i}/unit{j}/{gn1,gn2,gn3,gn_proj}/{scale,bias}
  head/{kernel,bias}                            only with `num_classes`
"""

from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models import heads

Dtype = Any


def weight_standardize(
  w: jax.Array, axis: Sequence[int], eps: float
) -> jax.Array:
  """Subtracts the mean and divides by the standard deviation over `axis`."""
  w = w - jnp.mean(w, axis=axis)
  return w / (jnp.std(w, axis=axis) + eps)


class StdConv(nn.Module):
  """Bias-free 'SAME' convolution whose kernel is weight-standardised on use.

  The stored parameter is the raw kernel `[kh, kw, in, out]` (as in published
  checkpoints, and as `nn.Conv` names and initialises it); it is standardised
  over the receptive field and input channels in float32 on every call.
  A 1x1 kernel runs as a matmul over the (strided) pixels: XLA's CPU
  convolution runs 1x1 kernels several times slower than the matmul
  (docs/benchmarks.md, "What changed").

  Attributes:
    features: output channels.
    kernel_size: `(kh, kw)`.
    strides: `(sh, sw)`.
    dtype: compute dtype; the kernel parameter stays float32.
  """

  features: int
  kernel_size: Tuple[int, int]
  strides: Tuple[int, int] = (1, 1)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param(
      'kernel',
      nn.initializers.lecun_normal(),
      (*self.kernel_size, x.shape[-1], self.features),
    )
    kernel = weight_standardize(kernel, axis=(0, 1, 2), eps=1e-5)
    kernel = kernel.astype(self.dtype)
    x = x.astype(self.dtype)
    if tuple(self.kernel_size) == (1, 1):
      sh, sw = self.strides
      return jnp.einsum('bhwc,cd->bhwd', x[:, ::sh, ::sw], kernel[0, 0])
    return jax.lax.conv_general_dilated(
      x,
      kernel,
      tuple(self.strides),
      'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    )


class GroupNorm(nn.Module):
  """GroupNorm over `[batch, height, width, channels]`, as `nn.GroupNorm`.

  Same parameters (`scale`, `bias` of shape `[channels]`), epsilon (1e-6)
  and float32 statistics as `nn.GroupNorm`, computed from per-channel sums
  over the pixels; XLA's CPU backend runs Flax's grouped reshape-and-reduce
  slower, forward and backward (docs/benchmarks.md, "What changed").

  Attributes:
    num_groups: groups of channels; must divide the channel count.
    dtype: compute dtype of the output.
    scale_init: initialiser of `scale` (ones; zeros for a unit's last norm).
    epsilon: added to the variance.
  """

  num_groups: int = 32
  dtype: Dtype = jnp.float32
  scale_init: Callable[..., jax.Array] = nn.initializers.ones
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    if channels % self.num_groups:
      raise ValueError(
        f'GroupNorm {self.name!r}: num_groups={self.num_groups} does not '
        f'divide the {channels} channels of input shape {x.shape}.'
      )
    scale = self.param('scale', self.scale_init, (channels,))
    bias = self.param('bias', nn.initializers.zeros, (channels,))
    xf = x.astype(jnp.float32)
    pixels = tuple(range(1, x.ndim - 1))
    count = channels // self.num_groups
    for axis in pixels:
      count *= x.shape[axis]

    def group_mean(channel_sums):  # [batch, channels] → [batch, groups]
      return (
        channel_sums.reshape(x.shape[0], self.num_groups, -1).sum(-1) / count
      )

    mean = group_mean(jnp.sum(xf, axis=pixels))
    var = jnp.maximum(group_mean(jnp.sum(xf * xf, axis=pixels)) - mean**2, 0)
    per_channel = lambda g: jnp.repeat(g, channels // self.num_groups, axis=1)
    mul = per_channel(jax.lax.rsqrt(var + self.epsilon)) * scale
    add = bias - per_channel(mean) * mul
    expand = lambda v: v.reshape(v.shape[0], *([1] * len(pixels)), channels)
    return (xf * expand(mul) + expand(add)).astype(self.dtype)


class ResidualUnit(nn.Module):
  """Bottleneck unit: 1x1 → 3x3 (strided) → 1x1 (4x wider), each conv
  followed by GroupNorm, with a projected shortcut when the shape changes.

  Attributes:
    features: bottleneck width; the unit outputs `4 * features` channels.
    strides: stride of the 3x3 conv and of the projection.
    dtype: compute dtype.
    num_groups: groups of every GroupNorm (BiT's 32); must divide
      `features`.
  """

  features: int
  strides: Tuple[int, int] = (1, 1)
  dtype: Dtype = jnp.float32
  num_groups: int = 32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda features, kernel, strides, name: StdConv(  # pylint: disable=g-long-lambda
      features=features,
      kernel_size=kernel,
      strides=strides,
      dtype=self.dtype,
      name=name,
    )
    norm = lambda name, **kw: GroupNorm(  # pylint: disable=g-long-lambda
      num_groups=self.num_groups, dtype=self.dtype, name=name, **kw
    )

    residual = x
    if x.shape[-1] != self.features * 4 or tuple(self.strides) != (1, 1):
      residual = conv(self.features * 4, (1, 1), self.strides, 'conv_proj')(x)
      residual = norm('gn_proj')(residual)

    y = nn.relu(norm('gn1')(conv(self.features, (1, 1), (1, 1), 'conv1')(x)))
    y = nn.relu(
      norm('gn2')(conv(self.features, (3, 3), self.strides, 'conv2')(y))
    )
    y = conv(self.features * 4, (1, 1), (1, 1), 'conv3')(y)
    # Zero-initialised last scale: every unit starts as the identity map.
    y = norm('gn3', scale_init=nn.initializers.zeros)(y)
    return nn.relu(residual + y)


class ResNetStage(nn.Module):
  """`block_size` residual units; the first one carries the stride.

  Attributes:
    block_size: number of units.
    nout: bottleneck width of every unit.
    first_stride: stride of the first unit.
    dtype: compute dtype.
    num_groups: see `ResidualUnit`.
  """

  block_size: int
  nout: int
  first_stride: Tuple[int, int]
  dtype: Dtype = jnp.float32
  num_groups: int = 32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.block_size):
      x = ResidualUnit(
        self.nout,
        strides=self.first_stride if i == 0 else (1, 1),
        dtype=self.dtype,
        num_groups=self.num_groups,
        name=f'unit{i + 1}',
      )(x)
    return x


ROOTS = ('imagenet', 'small')


class ResNet(nn.Module):
  """BiT-style ResNet classifier (bottleneck units, GroupNorm, StdConv).

  The root and stages are vit_jax's hybrid root (`VisionTransformer` with
  `resnet`), so ResNets and hybrids share code and parameter names. The units
  are post-activation (each ends in a ReLU after the residual sum, as vit_jax
  and ResNet v1.5), so the features are pooled directly, with no extra
  pre-head norm (BiT's v2 units are pre-activation and need one).

  Attributes:
    num_classes: width of the zero-initialised `head`; 0 or None returns the
      pooled features.
    width: width of the root; stage `i` has bottleneck width
      `width * 2**i` and outputs 4x as many channels.
    stages: residual units per stage; every stage after the first halves the
      resolution.
    root: 'imagenet' (7x7 stride-2 conv and a 3x3 stride-2 max-pool: 4x
      downsampling, BiT's and vit_jax's) or 'small' (a 3x3 stride-1 conv
      without pooling, for 28-32 px images).
    num_groups: groups of every GroupNorm (BiT's 32); must divide `width`.
    head_mlp_dim, head_dropout_rate, head_bias_init: as in VisionTransformer
      (GroupNorm keeps no batch statistics; `train` only affects an MLP
      head's dropout).
    model_name: the registry name; informational.
    dtype: compute dtype; parameters stay float32, logits are float32.
  """

  num_classes: Optional[int]
  width: int
  stages: Sequence[int]
  root: str = 'imagenet'
  num_groups: int = 32
  head_mlp_dim: Optional[int] = None
  head_dropout_rate: float = 0.0
  head_bias_init: float = 0.0
  model_name: Optional[str] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: jax.Array, *, train: bool) -> jax.Array:
    if inputs.ndim != 4:
      raise ValueError(
        f'ResNet expects images [batch, height, width, channels], got '
        f'shape {inputs.shape}.'
      )
    x = self._root(inputs)
    for i, block_size in enumerate(self.stages):
      x = ResNetStage(
        block_size=block_size,
        nout=self.width * 2**i,
        first_stride=(1, 1) if i == 0 else (2, 2),
        dtype=self.dtype,
        num_groups=self.num_groups,
        name=f'block{i + 1}',
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

  def _root(self, x: jax.Array) -> jax.Array:
    """Conv, GroupNorm, ReLU (and a max-pool for 'imagenet')."""
    if self.root not in ROOTS:
      raise ValueError(f'Unknown root={self.root!r}; expected one of {ROOTS}.')
    imagenet = self.root == 'imagenet'
    x = StdConv(
      features=self.width,
      kernel_size=(7, 7) if imagenet else (3, 3),
      strides=(2, 2) if imagenet else (1, 1),
      dtype=self.dtype,
      name='conv_root',
    )(x)
    x = nn.relu(
      GroupNorm(num_groups=self.num_groups, dtype=self.dtype, name='gn_root')(x)
    )
    if imagenet:
      x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding='SAME')
    return x
