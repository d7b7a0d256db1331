"""Test-time views: evaluation averaged over shifted copies of each image.

With `config.eval_shift = s` > 0, evaluation scores the mean of the
softmax over the (2s+1)² copies of each image shifted by -s..s pixels along
each axis (the pixels shifted in repeat the image's edge: black for MNIST).
A model's errors on images near its decision boundary often flip under a
one-pixel shift; averaging over the shifts removes part of that variance at
the cost of (2s+1)² forward passes per evaluated image. The plain, one-view
metrics are reported beside the averaged ones.
"""

import itertools
from typing import Callable, List, Tuple

import jax
import jax.numpy as jnp

from vit_jax.errors import ConfigError


def check_eval_shift(
  eval_shift: int,
  crop: int,
  key: str = 'config.eval_shift',
  crop_key: str = 'config.pp.crop',
) -> None:
  """A ConfigError naming `key` (and `crop_key`, where `crop` comes from)
  unless 0 <= eval_shift < crop / 2."""
  if not (isinstance(eval_shift, int) and 0 <= 2 * eval_shift < crop):
    raise ConfigError(
      f'{key}={eval_shift!r} must be an integer in [0, {(crop - 1) // 2}] '
      f'(pixels, less than half of {crop_key}={crop}); 0 evaluates each '
      'image once.'
    )


def offsets(eval_shift: int) -> List[Tuple[int, int]]:
  """The (rows, columns) shifts of the views, the unshifted view first."""
  span = range(-eval_shift, eval_shift + 1)
  shifted = [o for o in itertools.product(span, span) if o != (0, 0)]
  return [(0, 0), *shifted]


def describe(eval_shift: int) -> str:
  """'mean of 9 views shifted by up to 1 px', for logs and summaries."""
  return (
    f'mean of {len(offsets(eval_shift))} views shifted by up to {eval_shift} px'
  )


def shifted(images: jnp.ndarray, rows: int, cols: int) -> jnp.ndarray:
  """`images` `[N, H, W, C]` moved down by `rows` and right by `cols` pixels
  (negative: up, left); the uncovered border repeats the edge pixels."""
  margin = max(abs(rows), abs(cols))
  if not margin:
    return images
  height, width = images.shape[1:3]
  padded = jnp.pad(
    images, ((0, 0), (margin, margin), (margin, margin), (0, 0)), mode='edge'
  )
  top, left = margin - rows, margin - cols
  return padded[:, top : top + height, left : left + width]


def view_logits(
  logits_fn: Callable[[jnp.ndarray], jnp.ndarray],
  images: jnp.ndarray,
  eval_shift: int,
) -> List[jnp.ndarray]:
  """`logits_fn` of every view of `images`, the unshifted one first."""
  return [logits_fn(shifted(images, *o)) for o in offsets(eval_shift)]


def mean_log_probabilities(logits: List[jnp.ndarray]) -> jnp.ndarray:
  """log of the mean over views of their softmax, in float32 (computed as
  a log-mean-exp of log-softmaxes, so it stays finite where a probability
  underflows)."""
  log_probs = jnp.stack(
    [jax.nn.log_softmax(x.astype(jnp.float32)) for x in logits]
  )
  return jax.nn.logsumexp(log_probs, axis=0) - jnp.log(len(logits))
