"""Head-only training on cached features (`vit_jax.features`,
`config.finetune.cache_features`)."""

import json

import chex
import jax
import numpy as np
import optax
import pytest

from tests import helpers
from vit_jax import features
from vit_jax import finetune
from vit_jax import input_pipeline
from vit_jax import losses
from vit_jax import steps
from vit_jax import train as train_lib
from vit_jax.errors import ConfigError
from vit_jax.models import heads


def head_config(**overrides):
  config = helpers.job_config(**overrides)
  config.finetune.mode = 'head'
  config.finetune.cache_features = True
  config.pp.augment = 'none'
  return config


def micro_model_and_params(config, num_classes=10):
  model = finetune.build_model(
    config, num_classes, finetune.from_config(config.finetune)
  )
  images = np.zeros((2, helpers.CROP, helpers.CROP, 3), np.float32)
  return model, helpers.random_variables(model, images)['params']


@pytest.mark.parametrize('head', ['linear', 'mlp'])
def test_head_alone_on_features_gives_the_models_logits(head):
  config = head_config()
  config.finetune.head.type = head
  model, params = micro_model_and_params(config)
  images = jax.random.normal(
    jax.random.key(0), (4, helpers.CROP, helpers.CROP, 3)
  )
  cached = heads.head_inputs(model, params, images)
  chex.assert_shape(cached, (4, config.model.hidden_size))
  chex.assert_trees_all_close(
    heads.Head.of(model).apply({'params': params}, cached, train=False),
    model.apply({'params': params}, images, train=False),
    atol=1e-5,
  )


def test_a_step_on_features_equals_a_step_on_images():
  """The head's update from cached features is the update the whole
  (frozen) model makes from the images."""
  config = head_config()
  model, params = micro_model_and_params(config)
  fine = finetune.from_config(config.finetune)
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (8, helpers.CROP, helpers.CROP, 3))
  labels = rng.integers(0, 10, 8)
  optimizer = optax.sgd(0.1, momentum=0.9)
  devices = jax.local_devices()[:2]

  def one_step(loss_model, inputs):
    step = steps.data_parallel(
      steps.make_train_step(
        losses.classifier_loss(loss_model),
        optimizer,
        optax.constant_schedule(0.1),
        fine.is_trainable,
      ),
      devices=devices,
    )
    state = steps.replicate(
      steps.initial_state(params, optimizer, fine.is_trainable), devices
    )
    batch = steps.shard(
      {'image': inputs.reshape(2, 4, *inputs.shape[1:]), 'label': labels},
      devices,
    )
    batch['label'] = batch['label'].reshape(2, 4)
    new_state, metrics = step(state, batch)
    return steps.unreplicate(new_state).params, metrics['loss'][0]

  cached = np.asarray(
    heads.head_inputs(model, params, images.astype(np.float32))
  )
  from_images = one_step(model, images.astype(np.float32))
  from_features = one_step(heads.Head.of(model), cached)
  chex.assert_trees_all_close(from_features, from_images, atol=1e-5)
  assert not np.allclose(
    from_images[0]['head']['kernel'], params['head']['kernel']
  )


def test_feature_stream_visits_every_row_per_epoch_and_resumes():
  rows = np.arange(40, dtype=np.float32)[:, None] * np.ones((1, 3))
  labels = np.arange(40) % 10
  hosts = input_pipeline.Hosts(0, 1, 2)

  def stream(start_step, count):
    data = input_pipeline.feature_dataset(
      rows, labels, batch_size=8, seed=3, hosts=hosts, start_step=start_step
    )
    return [
      (b['image'].reshape(-1, 3)[:, 0], b['label'].reshape(-1))
      for b in data.take(count).as_numpy_iterator()
    ]

  first = stream(0, 10)
  chex.assert_shape(first[0][0], (8,))
  epoch = np.concatenate([ids for ids, _ in first[:5]])
  np.testing.assert_array_equal(np.sort(epoch), np.arange(40))
  second = np.concatenate([ids for ids, _ in first[5:]])
  assert not np.array_equal(epoch, second)  # A new order.
  np.testing.assert_array_equal(np.sort(second), np.arange(40))
  for ids, batch_labels in first:
    np.testing.assert_array_equal(batch_labels, ids.astype(int) % 10)
  resumed = stream(4, 6)
  chex.assert_trees_all_equal(resumed, first[4:])


def test_cache_refuses_what_would_change_training():
  config = head_config()
  model, params = micro_model_and_params(config)
  fine = finetune.from_config(config.finetune)
  features.check_cacheable(config, model, params, fine.is_trainable)

  augmented = head_config()
  augmented.pp.augment = 'pad_and_crop'
  with pytest.raises(ConfigError, match=r"config.pp.augment='pad_and_crop'"):
    features.check_cacheable(augmented, model, params, fine.is_trainable)

  full = finetune.from_config({**config.finetune.to_dict(), 'mode': 'full'})
  with pytest.raises(ConfigError, match='also train here'):
    features.check_cacheable(config, model, params, full.is_trainable)

  dropout = head_config()
  dropout.model.transformer.dropout_rate = 0.5
  random_model, _ = micro_model_and_params(dropout)
  with pytest.raises(ConfigError, match='random in training mode'):
    features.check_cacheable(dropout, random_model, params, fine.is_trainable)


@pytest.mark.slow
def test_trainer_trains_the_head_on_cached_features(tmp_path, caplog):
  caplog.set_level('INFO')
  config = head_config(
    total_steps=6, eval_every=6, checkpoint_every=6, base_lr=1e-2
  )
  results = train_lib.train_and_evaluate(config, str(tmp_path))
  assert 'Cached the features of 4000 training images' in caplog.text
  assert results['trainable_params'] == config.model.hidden_size * 10 + 10
  assert 0.0 <= results['test_accuracy'] <= 1.0
  losses_seen = [
    json.loads(line)['train/loss']
    for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()
    if 'train/loss' in line
  ]
  assert len(losses_seen) == 6 and losses_seen[-1] < losses_seen[0]
