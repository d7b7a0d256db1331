"""Test-time views: shifted copies and the mean of their softmax."""

import chex
import jax
import numpy as np
import pytest

from tests import helpers
from vit_jax import views
from vit_jax.errors import ConfigError


class ShiftedTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_equals_reference_for_every_offset(self):
    images = (
      np.random.default_rng(0).normal(size=[2, 7, 5, 3]).astype(np.float32)
    )
    for rows, cols in views.offsets(2):
      shift = self.variant(lambda x, r=rows, c=cols: views.shifted(x, r, c))
      chex.assert_trees_all_close(
        shift(images), helpers.numpy_shift(images, rows, cols), atol=0, rtol=0
      )


def test_a_shift_moves_a_dot_and_fills_with_the_edge():
  image = -np.ones([1, 6, 6, 1], np.float32)
  image[0, 2, 3] = 1.0
  moved = np.asarray(views.shifted(image, 1, -2))
  assert np.argwhere(moved[0, ..., 0] == 1.0).tolist() == [[3, 1]]
  assert (moved == -1.0).sum() == 35  # The background, shifted in too.


def test_offsets_cover_the_square_once_unshifted_first():
  for shift in (0, 1, 2):
    offsets = views.offsets(shift)
    assert offsets[0] == (0, 0)
    assert len(offsets) == len(set(offsets)) == (2 * shift + 1) ** 2
    assert max(max(abs(r), abs(c)) for r, c in offsets) == shift
  assert views.describe(1) == 'mean of 9 views shifted by up to 1 px'


def test_mean_log_probabilities_is_the_log_of_the_mean_softmax():
  rng = np.random.default_rng(1)
  logits = [rng.normal(size=[4, 10]).astype(np.float32) for _ in range(3)]
  expected = np.log(np.mean([jax.nn.softmax(x) for x in logits], axis=0))
  chex.assert_trees_all_close(
    views.mean_log_probabilities(logits), expected, rtol=1e-5, atol=1e-6
  )
  # Finite where every view gives a class a probability below float32's.
  extreme = [np.array([[0.0, -200.0]], np.float32)] * 2
  out = np.asarray(views.mean_log_probabilities(extreme))
  chex.assert_trees_all_close(out, np.array([[0.0, -200.0]]), atol=1e-5)


def test_eval_shift_is_checked():
  views.check_eval_shift(0, 28)
  views.check_eval_shift(13, 28)
  for bad in (-1, 14, 1.5):
    with pytest.raises(ConfigError, match=rf'config.eval_shift={bad} must be'):
      views.check_eval_shift(bad, 28)
