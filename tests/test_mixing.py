"""Mixup, CutMix and random erasing (`vit_jax.mixing`), each against a
reference computed here in NumPy, and their place in the train step."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from tests import helpers
from vit_jax import config_checks
from vit_jax import losses
from vit_jax import mixing
from vit_jax import models
from vit_jax import optim
from vit_jax import results
from vit_jax import steps
from vit_jax import train as train_lib
from vit_jax.errors import ConfigError

KEYS = 200


def normal_images(shape, seed=0):
  """Standard normal images: no two pixels equal, so each output pixel
  shows which input it came from."""
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def own_and_neighbour(targets):
  """Each row's weight of its own class and of its neighbour's, for
  targets of a batch whose image i has class i."""
  rows = np.arange(len(targets))
  return targets[rows, rows], targets[rows, (rows - 1) % len(targets)]


def keys(count, seed=0):
  return jax.random.split(jax.random.key(seed), count)


# ---------------------------------------------------------------- CutMix


@pytest.fixture(scope='module')
def cutmixed():
  """CutMix of 4 images (12 rows, 10 columns) of classes 0-3 under many
  keys, with a small alpha: lam near 0 or 1, many boxes clipped."""
  images = normal_images([4, 12, 10, 3])
  targets = jnp.eye(4)
  run = jax.jit(
    jax.vmap(lambda k: mixing.cutmix(k, images, targets, alpha=0.5))
  )
  out, mixed_targets = jax.device_get(run(keys(KEYS)))
  return images, out, mixed_targets


def test_cutmix_pastes_one_box_of_the_neighbour(cutmixed):
  images, out, _ = cutmixed
  neighbour = np.roll(images, 1, axis=0)
  for mixed in out:
    from_self = (mixed == images).all(-1)
    from_neighbour = (mixed == neighbour).all(-1)
    assert (from_self ^ from_neighbour).all()  # Every pixel is one of them.
    box = from_neighbour[0]
    assert (from_neighbour == box).all()  # The same box in every image.
    rows, cols = box.any(1), box.any(0)
    np.testing.assert_array_equal(box, rows[:, None] & cols[None, :])
    for line in (rows, cols):  # One contiguous span each.
      assert np.count_nonzero(np.diff(line.astype(int))) <= 2


def test_cutmix_targets_weigh_exactly_the_pasted_area(cutmixed):
  images, out, mixed_targets = cutmixed
  height, width = images.shape[1:3]
  neighbour = np.roll(images, 1, axis=0)
  clipped = 0
  for mixed, targets in zip(out, mixed_targets):
    pasted = (mixed == neighbour).all(-1) & (mixed != images).any(-1)
    counts = pasted.reshape(len(images), -1).sum(1)
    own, other = own_and_neighbour(targets)
    np.testing.assert_array_equal(np.round(other * height * width), counts)
    np.testing.assert_allclose(other, counts / (height * width), atol=1e-6)
    np.testing.assert_allclose(own, 1 - counts / (height * width), atol=1e-6)
    box = pasted[0]
    edges = (box[0], box[-1], box[:, 0], box[:, -1])
    clipped += any(edge.any() for edge in edges)
  # Boxes at the border, where clipping changes the area, are tested too.
  assert 20 < clipped < KEYS


def test_cutmix_boxes_are_drawn_as_in_the_paper():
  """With alpha = 1, lam ~ U(0, 1) and each side is a share L = sqrt(1 -
  lam) of the image's, centred uniformly: clipped, a side keeps L - L^2/4
  of it on average, so the mean pasted share is E[(L - L^2/4)^2] = 1/2 -
  1/5 + 1/48 (0.5 unclipped)."""
  masks, lams = jax.vmap(lambda k: mixing.cutmix_box(k, 64, 48, 1.0))(
    keys(4000)
  )
  shares = np.asarray(masks).mean((1, 2))
  np.testing.assert_allclose(shares, 1 - np.asarray(lams), atol=1e-6)
  np.testing.assert_allclose(shares.mean(), 1 / 2 - 1 / 5 + 1 / 48, atol=0.02)


# ----------------------------------------------------------------- Mixup


@pytest.mark.parametrize('larger_own', [False, True])
def test_mixup_blends_each_image_with_the_rolled_batch(larger_own):
  images = normal_images([5, 6, 6, 3])
  targets = np.eye(5, dtype=np.float32)
  for key in keys(8):
    out, mixed_targets = mixing.mixup(key, images, targets, 0.4, larger_own)
    lam = float(jax.random.beta(key, 0.4, 0.4))
    if larger_own:  # big_vision's: each image keeps the larger share.
      lam = max(lam, 1 - lam)
    expected = lam * images + (1 - lam) * np.roll(images, 1, axis=0)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    own, other = own_and_neighbour(np.asarray(mixed_targets))
    np.testing.assert_allclose(own, lam, rtol=1e-6)
    np.testing.assert_allclose(other, 1 - lam, rtol=1e-6, atol=1e-7)


# ----------------------------------------------- the switch and prob


def is_cutmix(out, images):
  """Whether every pixel is the image's own or its neighbour's."""
  neighbour = np.roll(images, 1, axis=0)
  return bool(((out == images).all(-1) | (out == neighbour).all(-1)).all())


def mixed_many(images, **options):
  targets = jnp.eye(len(images))
  run = jax.jit(
    jax.vmap(lambda k: mixing.mix(k, images, targets, **options)[0])
  )
  return jax.device_get(run(keys(KEYS, seed=1)))


def binomial_bounds(p, n=KEYS, sigmas=4):
  spread = sigmas * np.sqrt(p * (1 - p) / n)
  return p - spread, p + spread


@pytest.mark.parametrize('switch_prob', [0.0, 0.3, 1.0])
def test_the_switch_picks_cutmix_at_switch_prob(switch_prob):
  images = normal_images([4, 8, 8, 3])
  out = mixed_many(
    images, mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=switch_prob
  )
  share = np.mean([is_cutmix(o, images) for o in out])
  low, high = binomial_bounds(switch_prob)
  assert low <= share <= high


def test_prob_is_the_share_of_batches_mixed():
  images = normal_images([4, 8, 8, 3])
  out = mixed_many(images, mixup_alpha=1.0, prob=0.4)
  share = np.mean([not np.array_equal(o, images) for o in out])
  low, high = binomial_bounds(0.4)
  assert low <= share <= high
  untouched = mixed_many(images, mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.0)
  assert all(np.array_equal(o, images) for o in untouched)


# ------------------------------------------------------- random erasing


def erased(prob, area, shape=(64, 16, 20, 3)):
  images = normal_images(shape)
  out = mixing.random_erase(jax.random.key(3), images, prob, area)
  return images, np.asarray(out)


def test_random_erasing_fills_a_rectangle_of_area_in_range():
  area = (0.05, 0.3)
  images, out = erased(1.0, area)
  changed = (out != images).any(-1)
  shares = changed.mean((1, 2))
  hit = shares > 0
  assert hit.mean() > 0.9  # Nearly every image finds a rectangle that fits.
  assert (shares[hit] >= area[0]).all() and (shares[hit] <= area[1]).all()
  for mask in changed[hit]:
    rows, cols = mask.any(1), mask.any(0)
    np.testing.assert_array_equal(mask, rows[:, None] & cols[None, :])
    ratio = rows.sum() / cols.sum()  # Rounded sides: a little past 0.3.
    assert 0.2 <= ratio <= 5.0
  noise = out[changed]
  assert abs(noise.mean()) < 0.1 and abs(noise.std() - 1) < 0.1


def test_random_erasing_at_prob_0_leaves_the_images_and_at_half_erases_half():
  images, out = erased(0.0, (0.02, 1 / 3))
  np.testing.assert_array_equal(out, images)
  images, out = erased(0.5, (0.02, 1 / 3), shape=(400, 8, 8, 3))
  share = (out != images).any((1, 2, 3)).mean()
  low, high = binomial_bounds(0.5, n=400)
  assert low <= share <= high


# ------------------------------------------------------------- config


def mixing_config(**values):
  config = common.get_config()
  for key, value in values.items():
    group, name = key.split('__')
    config[group][name] = value
  return config


def test_the_default_config_transforms_nothing():
  assert mixing.from_config(common.get_config(), 10) is None
  assert mixing.active(mixing_config(mix__prob=0.0, mix__mixup_alpha=1.0)) == ()


def test_the_transform_of_a_config_turns_labels_into_targets():
  config = mixing_config(
    mix__mixup_p=0.2, mix__cutmix_alpha=1.0, random_erase__prob=0.5
  )
  assert mixing.active(config) == ('random_erase', 'mixup', 'cutmix')
  config.mix.cutmix_alpha = 0.0
  transform = mixing.from_config(config, 10)
  images = normal_images([8, 8, 8, 3])
  out, targets = transform(jax.random.key(0), images, jnp.arange(8) % 10)
  assert out.shape == images.shape and targets.shape == (8, 10)
  np.testing.assert_allclose(targets.sum(1), 1, rtol=1e-6)
  # mixup_p keeps the larger share for each image's own class.
  own, _ = own_and_neighbour(np.asarray(targets)[:, :8])
  assert (own >= 0.5).all()


@pytest.mark.parametrize(
  'values, message',
  [
    ({'mix__mixup_alpha': -1.0}, r'config\.mix\.mixup_alpha=-1\.0 must be'),
    ({'mix__cutmix_alpha': -0.1}, r'config\.mix\.cutmix_alpha=-0\.1 must'),
    ({'mix__switch_prob': 1.5}, r'config\.mix\.switch_prob=1\.5 .* \[0, 1\]'),
    ({'mix__prob': -0.1}, r'config\.mix\.prob=-0\.1 must be'),
    ({'random_erase__prob': 1.5}, r'config\.random_erase\.prob=1\.5 must'),
    ({'random_erase__area_min': 0.0}, r'config\.random_erase\.area_min=0\.0'),
    (
      {'random_erase__area_min': 0.5, 'random_erase__area_max': 0.2},
      r'config\.random_erase\.area_min=0\.5 is above',
    ),
    (
      {'mix__mixup_alpha': 0.2, 'mix__mixup_p': 0.2},
      r'config\.mix\.mixup_alpha=0\.2 and config\.mix\.mixup_p=0\.2 both',
    ),
  ],
)
def test_mixing_values_are_checked(values, message):
  config = helpers.job_config()
  for key, value in values.items():
    group, name = key.split('__')
    config[group][name] = value
  with pytest.raises(ConfigError, match='^' + message):
    config_checks.check(train_lib.with_complete_pp(config))


def test_runs_recorded_before_mixing_resume_with_it_off():
  """A record without the keys counts as mixing off (ADDED_KEYS)."""
  record = results.config_record(helpers.job_config())
  for key in list(record):
    if key.startswith(('mix.', 'random_erase.')):
      del record[key]
  assert results.config_changes(record, helpers.job_config()) == []
  mixed = helpers.job_config()
  mixed.mix.cutmix_alpha = 1.0
  assert results.config_changes(record, mixed) == [
    ('mix.cutmix_alpha', 0.0, 1.0)
  ]


def test_cached_features_refuse_mixing():
  config = helpers.job_config()
  config.finetune.update({'mode': 'head', 'cache_features': True})
  config.pp.update({'augment': 'none', 'flip': False})
  config.mix.cutmix_alpha = 1.0
  with pytest.raises(ConfigError, match='cutmix'):
    helpers.create_setup(config, 10)


# ------------------------------------------------------- the train step


@functools.lru_cache(maxsize=None)
def tiny_model(dropout: float):
  """Two-layer ViT-Micro_4 with `dropout` (a changed dropout key shows)."""
  config = helpers.micro_model_config()
  config.transformer.dropout_rate = dropout
  return models.build_model(config, num_classes=10)


def tiny_step(batch_transform=None, accum_steps=1, dropout=0.1):
  """A step-0 state and the train step of `tiny_model`, with
  `batch_transform`."""
  model = tiny_model(dropout)
  params = helpers.random_variables(
    model, jnp.zeros([1, helpers.CROP, helpers.CROP, 3])
  )['params']
  schedule = optim.learning_rate_schedule(
    base_lr=0.1, total_steps=10, warmup_steps=0, decay_type='constant'
  )
  # SGD: Adam's first steps would amplify the last-bit differences of
  # accumulation wherever a gradient is near zero.
  optimizer = optim.make_optimizer(
    'sgd',
    schedule,
    weight_decay=0.0,
    grad_norm_clip=1.0,
    moment_dtype='float32',
  )
  everything = lambda path: True  # noqa: E731
  state = steps.initial_state(params, optimizer, everything)
  step = steps.make_train_step(
    losses.classifier_loss(model, label_smoothing=0.1),
    optimizer,
    schedule,
    everything,
    accum_steps=accum_steps,
    batch_transform=batch_transform,
  )
  return state, step


def device_batch(devices=2, per_device=8, seed=0):
  rng = np.random.default_rng(seed)
  shape = [devices, per_device]
  return {
    'image': normal_images(shape + [helpers.CROP, helpers.CROP, 3], seed),
    'label': rng.integers(0, 10, shape).astype(np.int32),
  }


def run_pmap(state, step, batch, count=2):
  devices = jax.local_devices()[: len(batch['label'])]
  mapped = steps.data_parallel(step, devices=devices)
  placed = steps.replicate(state, devices)
  for _ in range(count):
    placed, metrics = mapped(placed, steps.shard(batch, devices))
  return jax.device_get(steps.unreplicate(placed)), jax.device_get(metrics)


def idle_transform(key, images, labels):
  """Mixing on, at probability 0: what it returns is what it was given."""
  targets = jax.nn.one_hot(labels, 10)
  return mixing.mix(
    key, images, targets, mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.0
  )


def test_mixing_off_leaves_the_train_step_bit_identical():
  """The default config builds the step without a transform; a transform
  that changes nothing changes neither the update nor dropout's masks."""
  assert mixing.from_config(helpers.job_config(), 10) is None
  batch = device_batch(devices=1)
  plain = run_pmap(*tiny_step(), batch)
  chex.assert_trees_all_equal(
    run_pmap(*tiny_step(idle_transform), batch), plain
  )


def test_mixing_changes_the_step_and_accumulation_does_not_change_mixing():
  """Each device's batch is mixed before it is split into micro-batches,
  so accumulating over 4 gives the update of the whole batch (no dropout:
  its masks differ per micro-batch)."""
  config = mixing_config(mix__mixup_alpha=1.0, mix__cutmix_alpha=1.0)
  transform = mixing.from_config(config, 10)
  batch = device_batch(devices=1)
  state, step = tiny_step(transform, dropout=0.0)
  whole, metrics = run_pmap(state, step, batch, count=1)
  parts, _ = run_pmap(
    *tiny_step(transform, accum_steps=4, dropout=0.0), batch, count=1
  )
  chex.assert_trees_all_close(whole.params, parts.params, rtol=1e-5, atol=1e-6)
  # The step trained on the mixed batch, not on the batch as given.
  loss_fn = losses.classifier_loss(tiny_model(0.0), label_smoothing=0.1)
  key = jax.random.key(0)
  plain = loss_fn(state.params, batch['image'][0], batch['label'][0], key)
  assert abs(metrics['loss'][0] - plain) > 1e-3


def test_both_engines_mix_each_device_batch_alike():
  """pmap's device d and the mesh's block d of the global batch draw the
  same mixing, and no image is mixed with another device's."""
  config = mixing_config(
    mix__mixup_alpha=1.0, mix__cutmix_alpha=1.0, random_erase__prob=0.5
  )
  transform = mixing.from_config(config, 16)
  batch = device_batch(devices=4, per_device=4)
  batch['label'] = np.arange(16, dtype=np.int32).reshape(4, 4)
  key = jax.random.key(7)
  devices = jax.local_devices()[:4]
  mapped = jax.pmap(
    lambda b: steps.transform_batch(transform, b, key),
    axis_name=steps.AXIS,
    devices=devices,
  )(steps.shard(batch, devices))
  flat = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), batch)
  meshed = jax.jit(
    lambda b: steps.transform_batch(transform, b, key, None, batch_shards=4)
  )(flat)
  mapped = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), mapped)
  # Two programs: a multiply-add may be fused in one and not the other.
  chex.assert_trees_all_close(mapped, meshed, rtol=1e-6, atol=1e-6)
  targets = np.asarray(meshed['label']).reshape(4, 4, 4, 4)
  for device in range(4):
    others = np.delete(targets[device], device, axis=1)
    assert (others == 0).all()
  assert not np.array_equal(np.asarray(meshed['image']), flat['image'])
