"""Classification heads shared by every model of the zoo.

vit_jax's head is a zero-initialised Dense named `head`; `MlpHead` is the
optional one-hidden-layer head of the fine-tuning modes (`head/{hidden,out}`).
Fine-tuning code finds either by the `head/` prefix of its parameters.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any


def classifier_head(
  x: Array,
  num_classes: Optional[int],
  mlp_dim: Optional[int],
  dropout_rate: float,
  bias_init: float,
  dtype: Dtype,
  train: bool,
) -> Array:
  """The `head` of a model (call it inside the model's compact method):
  vit_jax's zero-initialised Dense, an `MlpHead` with `mlp_dim`, or nothing
  without `num_classes`. Returns float32 logits (or features)."""
  if num_classes and mlp_dim:
    x = MlpHead(
      num_classes,
      mlp_dim,
      dropout_rate=dropout_rate,
      dtype=dtype,
      bias_init=bias_init,
      name='head',
    )(x, deterministic=not train)
  elif num_classes:
    x = nn.Dense(
      num_classes,
      dtype=dtype,
      kernel_init=nn.initializers.zeros,
      bias_init=nn.initializers.constant(bias_init),
      name='head',
    )(x)
  return x.astype(jnp.float32)


class MlpHead(nn.Module):
  """A classification head with one hidden layer: Dense → GELU → Dropout → Dense.

  On a frozen encoder, a linear head can only draw linear boundaries in the
  feature space the upstream task shaped; the hidden layer lets the head
  recombine those features non-linearly for a few more parameters. The output
  layer starts at zero, like vit_jax's linear head, so the first logits are
  the constant bias.

  Attributes:
    num_classes: output width.
    mlp_dim: hidden width.
    dropout_rate: dropout on the hidden activations.
    dtype: compute dtype.
    bias_init: constant initial value of the output bias.
  """

  num_classes: int
  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  bias_init: float = 0.0

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    x = nn.Dense(
      self.mlp_dim,
      dtype=self.dtype,
      kernel_init=nn.initializers.xavier_uniform(),
      name='hidden',
    )(x)
    x = nn.gelu(x)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    return nn.Dense(
      self.num_classes,
      dtype=self.dtype,
      kernel_init=nn.initializers.zeros,
      bias_init=nn.initializers.constant(self.bias_init),
      name='out',
    )(x)
