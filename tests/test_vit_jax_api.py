"""The entry points of Google's vit_jax that its users call, under their
names: `utils.create_learning_rate_schedule`, `input_pipeline.get_datasets`,
`models.VisionTransformer(**config)`, `train.make_update_fn`
(`checkpoint.load_pretrained` is tested in test_checkpoint.py)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from tests import helpers
from vit_jax import input_pipeline
from vit_jax import models
from vit_jax import steps
from vit_jax import train
from vit_jax import utils


def vit_jax_schedule(step, total_steps, base, decay_type, warmup_steps):
  """vit_jax's formula, written out (linear_end=1e-5)."""
  progress = np.clip((step - warmup_steps) / (total_steps - warmup_steps), 0, 1)
  if decay_type == 'linear':
    lr = 1e-5 + (base - 1e-5) * (1 - progress)
  elif decay_type == 'cosine':
    lr = base * 0.5 * (1 + np.cos(np.pi * progress))
  else:
    lr = base
  return lr * min(1.0, step / warmup_steps)


@pytest.mark.parametrize('decay_type', ['cosine', 'linear', 'constant'])
def test_create_learning_rate_schedule_is_vit_jax_s(decay_type):
  schedule = utils.create_learning_rate_schedule(
    total_steps=200, base=0.03, decay_type=decay_type, warmup_steps=20
  )
  steps = [0, 7, 20, 21, 110, 199, 200, 250]
  np.testing.assert_allclose(
    [float(schedule(s)) for s in steps],
    [vit_jax_schedule(s, 200, 0.03, decay_type, 20) for s in steps],
    rtol=1e-5,
    atol=1e-9,
  )


def test_get_datasets_returns_train_and_test_batches_per_device():
  config = common.with_dataset(common.get_config(), 'digits')
  config.pp.crop = 8
  config.batch, config.batch_eval, config.shuffle_buffer = 16, 64, 100
  ds_train, ds_test = input_pipeline.get_datasets(config)
  devices = jax.local_device_count()
  batch = next(ds_train.as_numpy_iterator())
  chex.assert_shape(batch['image'], (devices, 16 // devices, 8, 8, 3))
  chex.assert_shape(batch['label'], (devices, 16 // devices))
  masks = [b['mask'] for b in ds_test.as_numpy_iterator()]
  assert int(np.sum(masks)) == 360  # Every test image once.


@pytest.mark.parametrize(
  'name, size', [('testing', 21_390), ('testing-unpooled', 21_370)]
)
def test_vision_transformer_from_a_model_config(name, size):
  """vit_jax's `models.VisionTransformer(num_classes=..., **config)`, with
  its models_test.py parameter counts."""
  model = models.VisionTransformer(
    num_classes=1000, **models.MODEL_CONFIGS[name]
  )
  images = jnp.ones([2, 224, 224, 3])
  variables = helpers.random_variables(model, images)
  assert sum(x.size for x in jax.tree.leaves(variables)) == size
  out = model.apply(variables, images, train=False)
  chex.assert_shape(out, (2, 196, 1000) if 'unpooled' in name else (2, 1000))


@pytest.mark.parametrize('accum_steps', [1, 2])
def test_make_update_fn_is_one_sgd_step_on_the_whole_batch(accum_steps):
  """vit_jax's pmapped update over every local device, with one-hot labels
  and gradient accumulation, equals plain SGD on the whole batch at once."""
  model = models.get_model('testing', num_classes=10)
  model = model.clone(transformer={**model.transformer, 'dropout_rate': 0.0})
  devices = jax.local_device_count()
  per_device = 4
  images = jax.random.normal(
    jax.random.key(1), (devices * per_device, 32, 32, 3)
  )
  labels = jax.nn.one_hot(jnp.arange(devices * per_device) % 10, 10)
  params = helpers.random_variables(model, images[:1])['params']
  tx = optax.sgd(0.5)
  update_fn = train.make_update_fn(
    apply_fn=model.apply, accum_steps=accum_steps, tx=tx
  )
  batch = {
    'image': images.reshape(devices, per_device, 32, 32, 3),
    'label': labels.reshape(devices, per_device, 10),
  }
  new_params, _, loss, rng = update_fn(
    steps.replicate(params),
    steps.replicate(tx.init(params)),
    batch,
    steps.replicate(jax.random.PRNGKey(0)),  # vit_jax's raw uint32 key
  )

  def whole_batch_loss(p):
    logits = model.apply({'params': p}, images, train=False)
    return optax.softmax_cross_entropy(logits, labels).mean()

  expected_loss, grads = jax.value_and_grad(whole_batch_loss)(params)
  expected = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
  chex.assert_trees_all_close(
    steps.unreplicate(new_params), expected, rtol=1e-4, atol=1e-6
  )
  np.testing.assert_allclose(loss, np.full(devices, expected_loss), rtol=1e-5)
  assert not np.array_equal(steps.unreplicate(rng), jax.random.PRNGKey(0))
