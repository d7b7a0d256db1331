"""The training loss of a classifier, and the sums evaluation adds up."""

from typing import Any, Callable, Dict

import jax
import jax.numpy as jnp
import optax


def cross_entropy(
  logits: jnp.ndarray, labels: jnp.ndarray, label_smoothing: float = 0.0
) -> jnp.ndarray:
  """Mean softmax cross-entropy against (optionally smoothed) targets.

  `labels` are class indices `[B]`, or targets `[B, classes]` (one-hot, as
  vit_jax's input pipeline gives, or soft, as `vit_jax.mixing` makes).
  Smoothing is affine in the targets, (1 - s) * t + s / classes, so
  smoothing mixed targets equals mixing smoothed ones (timm's order).
  """
  if labels.ndim < logits.ndim:
    labels = jax.nn.one_hot(labels, logits.shape[-1])
  targets = optax.smooth_labels(labels.astype(jnp.float32), label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()


def eval_sums(
  logits: jnp.ndarray, labels: jnp.ndarray, mask: jnp.ndarray
) -> Dict[str, jnp.ndarray]:
  """Sums over the real (mask=True) examples: correct, loss, count."""
  weights = mask.astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(
    logits.astype(jnp.float32), labels
  )
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return {
    'correct': (correct * weights).sum(),
    'loss': (losses * weights).sum(),
    'count': weights.sum(),
  }


LossFn = Callable[[Any, jnp.ndarray, jnp.ndarray, jax.Array], jnp.ndarray]


def classifier_loss(model: Any, label_smoothing: float = 0.0) -> LossFn:
  """`loss(params, images, labels, dropout_key)` of `model` in training mode:
  the mean cross-entropy of its logits (see `cross_entropy`)."""

  def loss(params, images, labels, dropout_key):
    logits = model.apply(
      {'params': params}, images, train=True, rngs={'dropout': dropout_key}
    )
    return cross_entropy(logits, labels, label_smoothing)

  return loss
