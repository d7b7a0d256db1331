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


def head_inputs(
  model: nn.Module,
  params: Any,
  images: Array,
  *,
  train: bool = False,
  rngs: Optional[dict] = None,
) -> Array:
  """What `model`'s `head` receives for `images`: its pre-logits
  representation, float32 (evaluation mode unless `train`)."""
  seen = []

  def record(call, args, kwargs, context):
    if context.module.name == 'head' and context.method_name == '__call__':
      seen.append(args[0])
    return call(*args, **kwargs)

  with nn.intercept_methods(record):
    model.apply({'params': params}, images, train=train, rngs=rngs)
  if not seen:
    raise ValueError(
      f'{type(model).__name__} has no module named head (built without '
      'num_classes?); its representation is the input of that head.'
    )
  return seen[0].astype(jnp.float32)


class Head(nn.Module):
  """A model's head alone, applied to the model's pre-logits features: the
  same logits, from the same parameters (`head/...`; others are ignored),
  without the encoder. Head-only training on cached features uses it.

  Attributes mirror `classifier_head`'s arguments; `Head.of(model)` copies
  them from a model of the zoo.
  """

  num_classes: int
  mlp_dim: Optional[int] = None
  dropout_rate: float = 0.0
  bias_init: float = 0.0
  dtype: Dtype = jnp.float32

  @classmethod
  def of(cls, model: nn.Module) -> 'Head':
    return cls(
      model.num_classes,
      getattr(model, 'head_mlp_dim', None),
      getattr(model, 'head_dropout_rate', 0.0),
      getattr(model, 'head_bias_init', 0.0),
      model.dtype,
    )

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    return classifier_head(
      x.astype(self.dtype),
      self.num_classes,
      self.mlp_dim,
      self.dropout_rate,
      self.bias_init,
      self.dtype,
      train,
    )
