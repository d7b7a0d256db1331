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

from typing import Any, Callable, Optional, Sequence, Tuple, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models import heads

T = TypeVar('T')
Dtype = Any


def weight_standardize(w: jax.Array, axis: Sequence[int],
                       eps: float) -> jax.Array:
  """Subtracts the mean and divides by the standard deviation over `axis`."""
  w = w - jnp.mean(w, axis=axis)
  return w / (jnp.std(w, axis=axis) + eps)


class StdConv(nn.Conv):
  """Convolution whose kernel is weight-standardised on every use.

  The stored parameter is the raw kernel (as in published checkpoints); the
  standardisation over the receptive field and input channels is applied in
  float32 each time the kernel is read.
  """

  def param(self, name: str, init_fn: Callable[..., T], *init_args,
            **init_kwargs) -> T:
    value = super().param(name, init_fn, *init_args, **init_kwargs)
    if name == 'kernel':
      value = weight_standardize(value, axis=(0, 1, 2), eps=1e-5)
    return value


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
        features=features, kernel_size=kernel, strides=strides,
        use_bias=False, dtype=self.dtype, name=name)
    norm = lambda name, **kw: nn.GroupNorm(  # pylint: disable=g-long-lambda
        num_groups=self.num_groups, dtype=self.dtype, name=name, **kw)

    residual = x
    if x.shape[-1] != self.features * 4 or tuple(self.strides) != (1, 1):
      residual = conv(self.features * 4, (1, 1), self.strides, 'conv_proj')(x)
      residual = norm('gn_proj')(residual)

    y = nn.relu(norm('gn1')(conv(self.features, (1, 1), (1, 1), 'conv1')(x)))
    y = nn.relu(
        norm('gn2')(conv(self.features, (3, 3), self.strides, 'conv2')(y)))
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
          name=f'unit{i + 1}')(x)
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
          f'shape {inputs.shape}.')
    x = self._root(inputs)
    for i, block_size in enumerate(self.stages):
      x = ResNetStage(
          block_size=block_size,
          nout=self.width * 2**i,
          first_stride=(1, 1) if i == 0 else (2, 2),
          dtype=self.dtype,
          num_groups=self.num_groups,
          name=f'block{i + 1}')(x)
    x = jnp.mean(x, axis=(1, 2))
    return heads.classifier_head(x, self.num_classes, self.head_mlp_dim,
                                 self.head_dropout_rate, self.head_bias_init,
                                 self.dtype, train)

  def _root(self, x: jax.Array) -> jax.Array:
    """Conv, GroupNorm, ReLU (and a max-pool for 'imagenet')."""
    if self.root not in ROOTS:
      raise ValueError(
          f'Unknown root={self.root!r}; expected one of {ROOTS}.')
    imagenet = self.root == 'imagenet'
    x = StdConv(
        features=self.width,
        kernel_size=(7, 7) if imagenet else (3, 3),
        strides=(2, 2) if imagenet else (1, 1),
        use_bias=False, dtype=self.dtype, name='conv_root')(x)
    x = nn.relu(nn.GroupNorm(num_groups=self.num_groups, dtype=self.dtype,
                             name='gn_root')(x))
    if imagenet:
      x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding='SAME')
    return x
