"""vit_jax.benchmarks.timing: what the benchmarks and inference_time count."""

import chex
import jax
import numpy as np
import pytest

from tests import helpers
from vit_jax import models
from vit_jax import steps
from vit_jax.benchmarks import timing
from vit_jax.models import table


def micro_forward(batch: int, devices=None):
  config = helpers.job_config()
  model = models.build_model(config.model, num_classes=10)
  variables = table.abstract_variables(model, helpers.CROP)
  params = helpers.random_variables(
    model, np.zeros([1, helpers.CROP, helpers.CROP, 3], np.float32)
  )['params']
  return (
    timing.forward_workload(model, params, batch, helpers.CROP, devices),
    table.forward_flops(model, variables, helpers.CROP),
  )


def test_time_rounds_warms_up_then_alternates():
  calls = []
  runs = {name: (lambda name=name: calls.append(name)) for name in 'abc'}
  seconds = timing.time_rounds(runs, rounds=3, warmup=2)
  assert calls == ['a', 'a', 'b', 'b', 'c', 'c'] + ['a', 'b', 'c'] * 3
  assert {name: len(s) for name, s in seconds.items()} == {
    'a': 3,
    'b': 3,
    'c': 3,
  }
  assert all(t >= 0 for s in seconds.values() for t in s)
  calls.clear()
  timing.time_rounds(runs, rounds=2, warmup=0, settle=1)
  assert calls == ['a', 'a', 'b', 'b', 'c', 'c'] * 2
  with pytest.raises(ValueError, match='rounds=0'):
    timing.time_rounds(runs, rounds=0)


def test_forward_flops_per_image_match_the_model_table():
  """16 images over 8 devices count as 16 single-image forward passes."""
  workload, table_flops = micro_forward(batch=16)
  np.testing.assert_allclose(workload.flops / 16, table_flops, rtol=1e-2)
  assert workload.trainable_params == 0
  assert workload.memory_bytes >= 4 * workload.params  # Holds the weights.
  workload.run()


def test_train_step_flops_full_vs_head_only():
  """Backward costs about two forwards; a head-only step differentiates only
  the head, so it costs about one forward. (8 images per device, so the
  optimizer update, repeated on every device, is a small part.)"""
  _, forward = micro_forward(batch=8)
  full = timing.train_workload(helpers.job_config(batch=64), num_classes=10)
  head = timing.train_workload(
    helpers.job_config(batch=64, finetune={'mode': 'head'}), num_classes=10
  )
  assert 2.5 < full.flops / full.images / forward < 4.0
  assert 0.95 < head.flops / head.images / forward < 1.3
  assert full.trainable_params == full.params
  assert head.trainable_params < full.params / 10
  for _ in range(3):  # The donated state is replaced after every call.
    full.run()


def test_the_timed_train_step_is_the_trainers():
  """`experiment.build` makes the benchmark's step as the trainer's: with a
  moving average, the state carries one and the step updates it."""
  devices = jax.local_devices()[:1]
  step, state, _ = timing.train_step_and_state(
    helpers.job_config(batch=8, ema_decay=0.5), 10, devices
  )
  assert state.ema_params is not None
  initial = jax.device_get(steps.unreplicate(state).params)
  batch = timing.synthetic_batch(8, helpers.CROP, 10, devices)
  for _ in range(2):
    state, _ = step(state, batch)
  trained = jax.device_get(steps.unreplicate(state))
  # Two updates p1, p2 at decay 0.5: the average is (0.5 p1 + p2) / 1.5,
  # neither the weights nor the initial weights.
  averaged = steps.evaluated_params(trained)['head']['kernel']
  assert not np.allclose(averaged, trained.params['head']['kernel'])
  assert not np.allclose(averaged, initial['head']['kernel'])
  with pytest.raises(ValueError, match='cache_features=True'):
    timing.train_step_and_state(
      helpers.job_config(finetune={'mode': 'head', 'cache_features': True}),
      10,
      devices,
    )


def test_synthetic_batch_is_split_over_devices():
  devices = jax.local_devices()
  batch = timing.synthetic_batch(16, 4, 10, devices)
  chex.assert_shape(batch['image'], (len(devices), 16 // len(devices), 4, 4, 3))
  assert {shard.device for shard in batch['image'].addressable_shards} == set(
    devices
  )
  assert int(batch['label'].max()) < 10
  with pytest.raises(ValueError, match='Batch 12 does not split over 8'):
    timing.synthetic_batch(12, 4, 10, devices)


def test_matmul_peak_reports_the_best_size():
  peak = timing.matmul_peak(sizes=(32, 64), rounds=2)
  assert peak['size'] in (32, 64)
  assert peak['flops_per_s'] > 0
