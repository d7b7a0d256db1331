"""MLP-Mixer (Tolstikhin et al., 2021) with vit_jax's parameter names.

stem/{kernel,bias}
MixerBlock_{i}/LayerNorm_0, token_mixing/Dense_{0,1},
MixerBlock_{i}/LayerNorm_1, channel_mixing/Dense_{0,1}
pre_head_layer_norm
head/{kernel,bias}                  only with `num_classes`
head/{hidden,out}/{kernel,bias}     instead, with `head_mlp_dim`
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models import heads
from vit_jax.models.vit import MlpBlock
from vit_jax.models.vit import PatchEmbedding

Dtype = Any


def _mixing_mlp(mlp_dim: int, dtype: Dtype, name: str) -> MlpBlock:
  """The Mixer MLP: the Transformer MLP block without dropout, with Flax's
  default (LeCun normal, zero bias) initialisation."""
  return MlpBlock(
    mlp_dim=mlp_dim,
    dtype=dtype,
    dropout_rate=0.0,
    kernel_init=nn.initializers.lecun_normal(),
    bias_init=nn.initializers.zeros,
    name=name,
  )


class MixerBlock(nn.Module):
  """Token mixing across patches, then channel mixing, each pre-norm residual.

  Attributes:
    tokens_mlp_dim: hidden width of the token-mixing MLP.
    channels_mlp_dim: hidden width of the channel-mixing MLP.
    dtype: compute dtype.
  """

  tokens_mlp_dim: int
  channels_mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = jnp.swapaxes(y, 1, 2)
    y = _mixing_mlp(self.tokens_mlp_dim, self.dtype, 'token_mixing')(
      y, deterministic=True
    )
    x = x + jnp.swapaxes(y, 1, 2)
    y = nn.LayerNorm(dtype=self.dtype)(x)
    return x + _mixing_mlp(self.channels_mlp_dim, self.dtype, 'channel_mixing')(
      y, deterministic=True
    )


class MlpMixer(nn.Module):
  """MLP-Mixer classifier.

  Attributes:
    patches: {'size': (ph, pw)}.
    num_classes: width of the head; 0 or None returns the pooled features.
    num_blocks: number of Mixer blocks.
    hidden_dim: token width.
    tokens_mlp_dim: hidden width of token mixing.
    channels_mlp_dim: hidden width of channel mixing.
    head_mlp_dim, head_dropout_rate, head_bias_init: as in VisionTransformer
      (the Mixer has no dropout; `train` only affects an MLP head's).
    model_name: the registry name; informational.
    dtype: compute dtype; parameters stay float32, logits are float32.
  """

  patches: Any
  num_classes: Optional[int]
  num_blocks: int
  hidden_dim: int
  tokens_mlp_dim: int
  channels_mlp_dim: int
  head_mlp_dim: Optional[int] = None
  head_dropout_rate: float = 0.0
  head_bias_init: float = 0.0
  model_name: Optional[str] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: jax.Array, *, train: bool) -> jax.Array:
    if inputs.ndim != 4:
      raise ValueError(
        f'MlpMixer expects images [batch, height, width, channels], got '
        f'shape {inputs.shape}.'
      )
    size = tuple(self.patches['size'])
    x = PatchEmbedding(
      self.hidden_dim, size, padding='SAME', dtype=self.dtype, name='stem'
    )(inputs)
    n, h, w, c = x.shape
    x = jnp.reshape(x, (n, h * w, c))
    for _ in range(self.num_blocks):
      x = MixerBlock(
        self.tokens_mlp_dim, self.channels_mlp_dim, dtype=self.dtype
      )(x)
    x = nn.LayerNorm(dtype=self.dtype, name='pre_head_layer_norm')(x)
    x = jnp.mean(x, axis=1)
    return heads.classifier_head(
      x,
      self.num_classes,
      self.head_mlp_dim,
      self.head_dropout_rate,
      self.head_bias_init,
      self.dtype,
      train,
    )
