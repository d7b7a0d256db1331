"""Few-shot linear evaluation (`vit_jax.fewshot`)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers
from vit_jax import features
from vit_jax import fewshot
from vit_jax import input_pipeline
from vit_jax import models
from vit_jax.errors import ConfigError
from vit_jax.models import heads


def micro_model_and_params(num_classes=10, **head):
  config = helpers.job_config()
  model = models.build_model(config.model, num_classes=num_classes, **head)
  images = jnp.zeros((2, helpers.CROP, helpers.CROP, 3))
  return model, helpers.random_variables(model, images)['params']


@pytest.mark.parametrize('head', [{}, {'head_mlp_dim': 16}])
def test_head_inputs_are_what_the_head_maps_to_logits(head):
  model, params = micro_model_and_params(**head)
  images = jax.random.normal(
    jax.random.key(0), (4, helpers.CROP, helpers.CROP, 3)
  )
  features = heads.head_inputs(model, params, images)
  chex.assert_shape(features, (4, model.hidden_size))
  if head:
    hidden = jax.nn.gelu(
      features @ params['head']['hidden']['kernel']
      + params['head']['hidden']['bias']
    )  # Flax's nn.gelu: the tanh form.
    logits = (
      hidden @ params['head']['out']['kernel'] + params['head']['out']['bias']
    )
  else:
    logits = features @ params['head']['kernel'] + params['head']['bias']
  chex.assert_trees_all_close(
    logits, model.apply({'params': params}, images, train=False), atol=1e-5
  )


@pytest.mark.parametrize('n, d', [(12, 30), (40, 8)])
def test_ridge_solution_is_the_closed_form_of_both_sides(n, d):
  """The fit equals the primal (d × d) and the dual (n × n) closed forms,
  whichever side it solves."""
  rng = np.random.default_rng(0)
  features = rng.normal(size=(n, d)) * 3.0 + 1.0
  labels = np.arange(n) % 4
  mean, weights, bias = fewshot.ridge_fit(features, labels, 4, l2_reg=0.5)
  centred = features - features.mean(0)
  targets = 2.0 * np.eye(4)[labels] - 1.0
  residual = targets - targets.mean(0)
  penalty = 0.5 * np.sum(centred**2) / n
  primal = np.linalg.solve(
    centred.T @ centred + penalty * np.eye(d), centred.T @ residual
  )
  dual = centred.T @ np.linalg.solve(
    centred @ centred.T + penalty * np.eye(n), residual
  )
  chex.assert_trees_all_close(weights, primal, atol=1e-8)
  chex.assert_trees_all_close(weights, dual, atol=1e-8)
  chex.assert_trees_all_close(mean, features.mean(0))
  chex.assert_trees_all_close(bias, targets.mean(0))


def test_ridge_separates_clusters_and_not_random_labels():
  rng = np.random.default_rng(1)
  centres = rng.normal(size=(5, 64)) * 4.0

  def sample(per_class):
    labels = np.repeat(np.arange(5), per_class)
    return centres[labels] + rng.normal(size=(len(labels), 64)), labels

  train, test = sample(3), sample(40)
  fit = fewshot.ridge_fit(*train, 5, l2_reg=0.1)
  assert fewshot.ridge_accuracy(fit, *test) == 1.0
  shuffled = rng.permutation(train[1])
  while (shuffled == train[1]).all():
    shuffled = rng.permutation(train[1])
  noise_fit = fewshot.ridge_fit(train[0], shuffled, 5, l2_reg=0.1)
  assert fewshot.ridge_accuracy(noise_fit, *test) < 0.8


def test_first_per_class_keeps_split_order():
  labels = np.array([2, 0, 2, 1, 0, 2, 0])
  np.testing.assert_array_equal(
    fewshot.first_per_class(labels, 2, 3), [1, 4, 3, 0, 2]
  )


def test_still_needed_keeps_the_first_of_each_class_across_batches():
  counts = np.zeros(3, np.int64)
  first = fewshot.still_needed(np.array([2, 0, 2, 2, 1]), counts, 2)
  np.testing.assert_array_equal(first, [True, True, True, False, True])
  second = fewshot.still_needed(np.array([2, 1, 0, 1]), counts, 2)
  np.testing.assert_array_equal(second, [False, True, True, False])
  np.testing.assert_array_equal(counts, [2, 2, 2])


def test_evaluator_equals_ridge_on_the_whole_splits():
  """Batching, masks and the choice of shots give what one ridge fit on
  features of the whole splits gives."""
  config = helpers.job_config(batch_eval=96, dataset='digits')
  config.fewshot.shots = (1, 3)
  source = input_pipeline.get_source(config.dataset)
  model, params = micro_model_and_params()
  evaluator = fewshot.Evaluator(model, source, config)
  results = evaluator(params)
  assert sorted(results) == ['1shot', '3shot']
  assert len(evaluator.train.labels) == 3 * 10

  def whole(split, batch):
    data = input_pipeline.eval_dataset(
      source,
      config.pp,
      batch_size=batch,
      hosts=input_pipeline.Hosts(0, 1, 1),
      split=split,
    )
    images, labels = map(np.concatenate, zip(*features.examples(data)))
    return np.asarray(heads.head_inputs(model, params, images)), labels

  train_x, train_y = whole(config.pp.train, 1000)
  test_x, test_y = whole(config.pp.test, 1000)
  assert len(test_y) == 360  # digits' test split.
  for k in (1, 3):
    keep = fewshot.first_per_class(train_y, k, 10)
    fit = fewshot.ridge_fit(train_x[keep], train_y[keep], 10, 0.1)
    expected = fewshot.ridge_accuracy(fit, test_x, test_y)
    assert results[f'{k}shot'] == pytest.approx(expected, abs=2e-3)
  assert results['3shot'] > 0.2  # Random features, still above chance.


def test_bad_shots_are_a_config_error():
  config = helpers.job_config()
  config.fewshot.shots = (0, 5)
  source = input_pipeline.get_source(config.dataset)
  model, _ = micro_model_and_params()
  with pytest.raises(ConfigError, match=r'config.fewshot.shots=\(0, 5\)'):
    fewshot.Evaluator(model, source, config)
