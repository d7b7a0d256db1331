"""BiT-style ResNet pieces used as the root of hybrid R+ViT models.

Convolutions use weight standardisation and every normalisation is a
GroupNorm (Kolesnikov et al., "Big Transfer"), as vit_jax's hybrids do; the
parameter names (`conv1`, `gn1`, ..., `conv_proj`, `gn_proj`, `unit{j}`) are
vit_jax's.
"""

from typing import Any, Callable, Sequence, Tuple, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp

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
  """

  features: int
  strides: Tuple[int, int] = (1, 1)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda features, kernel, strides, name: StdConv(  # pylint: disable=g-long-lambda
        features=features, kernel_size=kernel, strides=strides,
        use_bias=False, dtype=self.dtype, name=name)
    norm = lambda name, **kw: nn.GroupNorm(dtype=self.dtype, name=name, **kw)

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
  """

  block_size: int
  nout: int
  first_stride: Tuple[int, int]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.block_size):
      x = ResidualUnit(
          self.nout,
          strides=self.first_stride if i == 0 else (1, 1),
          dtype=self.dtype,
          name=f'unit{i + 1}')(x)
    return x
