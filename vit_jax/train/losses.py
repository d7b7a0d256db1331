"""Training loss and evaluation sums."""

from typing import Dict

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray,
                  label_smoothing: float = 0.0) -> jnp.ndarray:
  """Mean softmax cross-entropy against (optionally smoothed) one-hot labels."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]),
                                label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32),
                                     targets).mean()


def eval_sums(logits: jnp.ndarray, labels: jnp.ndarray,
              mask: jnp.ndarray) -> Dict[str, jnp.ndarray]:
  """Sums over the real (mask=True) examples: correct, loss, count."""
  weights = mask.astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return {'correct': (correct * weights).sum(),
          'loss': (losses * weights).sum(),
          'count': weights.sum()}
