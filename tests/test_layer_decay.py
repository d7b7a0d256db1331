"""Per-parameter optimizer control (`vit_jax.optim.Multipliers`): BEiT's
layer-wise learning-rate decay (`config.layer_decay`) and big_vision's
regex multipliers (`config.lr_mults`, `config.wd_mults`), read off the
updates themselves: with SGD at learning rate 1 the first update of a leaf
is -factor * gradient."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests import helpers
from vit_jax import config_checks
from vit_jax import losses
from vit_jax import models
from vit_jax import optim
from vit_jax import results
from vit_jax import steps
from vit_jax import trainable as trainable_lib
from vit_jax.errors import ConfigError

LAYERS = 3
DECAY = 0.5
CROP = 8
CLASSES = 3


def model_config(**transformer):
  """ViT-Micro_4 cut to `LAYERS` layers, with a class token and learned
  position embeddings (every embedding leaf BEiT assigns to layer 0)."""
  config = helpers.micro_model_config()
  config.transformer.num_layers = LAYERS
  config.transformer.update(transformer)
  config.classifier = 'token'
  config.posemb = 'learned'
  return config


def job(model=None, **overrides):
  """SGD at a constant learning rate 1, no clipping: the first update of a
  leaf is minus its gradient times its factor."""
  settings = dict(
    optimizer='sgd',
    base_lr=1.0,
    warmup_steps=0,
    decay_type='constant',
    grad_norm_clip=None,
    optim_dtype='float32',
  )
  settings.update(overrides)
  config = helpers.job_config(**settings)
  config.model = model or model_config()
  return config


def params_of(config):
  model = models.build_model(config.model, num_classes=CLASSES)
  images = jnp.zeros((1, CROP, CROP, 3))
  return helpers.random_variables(model, images)['params']


def gradients_like(params, seed=1):
  """A random normal tree shaped as `params`."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return tree.unflatten(
    [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
  )


def first_update(config, params, grads):
  _, optimizer = optim.from_config(config)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  return updates


def flat(tree):
  return dict(zip(trainable_lib.paths(tree), jax.tree.leaves(tree)))


def beit_factor(path):
  """The formula, written out per kind of leaf (L = LAYERS)."""
  if path.startswith(('embedding/', 'Transformer/posembed_input/')):
    return DECAY ** (LAYERS + 1)
  if path == 'cls':
    return DECAY ** (LAYERS + 1)
  if path.startswith('Transformer/encoderblock_'):
    i = int(path.split('/')[1].rpartition('_')[2])
    return DECAY ** (LAYERS - i)
  assert path.startswith(('Transformer/encoder_norm/', 'head/')), path
  return 1.0


# ------------------------------------------------------------ layer decay


def test_each_leaf_gets_the_factor_of_its_layer():
  config = job(layer_decay=DECAY)
  params = params_of(config)
  grads = gradients_like(params)
  updates = flat(first_update(config, params, grads))
  grads = flat(grads)
  assert {'cls', 'Transformer/posembed_input/pos_embedding'} <= set(updates)
  for path, update in updates.items():
    expected = -np.asarray(grads[path]) * np.float32(beit_factor(path))
    np.testing.assert_array_equal(update, expected, err_msg=path)


def test_scanned_blocks_get_one_factor_per_layer():
  """The stacked layout: layer i along the leading axis gets decay^(L-i)."""
  config = job(layer_decay=DECAY, model=model_config(scan=True))
  params = params_of(config)
  grads = gradients_like(params)
  updates = flat(first_update(config, params, grads))
  grads = flat(grads)
  stacked = [p for p in updates if p.startswith('Transformer/encoderblock/')]
  assert stacked
  per_layer = np.float32(DECAY ** (LAYERS - np.arange(LAYERS)))
  for path, update in updates.items():
    grad = np.asarray(grads[path])
    if path in stacked:
      factor = per_layer.reshape((LAYERS,) + (1,) * (grad.ndim - 1))
    else:
      factor = np.float32(beit_factor(path))
    np.testing.assert_array_equal(update, -grad * factor, err_msg=path)


def test_layer_ids_of_hybrid_roots_stems_and_heads():
  """BEiT's assignment: whatever comes before the blocks is the embedding
  (layer 0), whatever after them the last layer."""
  for path in (
    'embedding/kernel',
    'cls',
    'Transformer/posembed_input/pos_embedding',
    'conv_root/kernel',
    'gn_root/scale',
    'block1/unit1/conv1/kernel',
    'stem_conv0/kernel',
    'stem_norm2/bias',
  ):
    assert optim.vit_layer_id(path, 12) == 0, path
  assert optim.vit_layer_id('Transformer/encoderblock_0/LayerNorm_0/bias', 12)
  assert (
    optim.vit_layer_id('Transformer/encoderblock_11/MlpBlock_0/a/kernel', 12)
    == 12
  )
  for path in (
    'Transformer/encoder_norm/scale',
    'pre_logits/kernel',
    'head/kernel',
    'head/hidden/bias',
  ):
    assert optim.vit_layer_id(path, 12) == 13, path
  np.testing.assert_array_equal(
    optim.vit_layer_id('Transformer/encoderblock/LayerNorm_0/scale', 3),
    [1, 2, 3],
  )


def test_frozen_leaves_get_no_update_and_no_factor():
  """Head-only fine-tuning: the optimizer sees the head alone (factor 1),
  and a train step leaves every other leaf as it was."""
  config = job(layer_decay=DECAY)
  params = params_of(config)
  trained, frozen = trainable_lib.partition(params, trainable_lib.is_head)
  grads = gradients_like(trained)
  updates = flat(first_update(config, trained, grads))
  assert set(updates) == {'head/kernel', 'head/bias'}
  for path, grad in flat(grads).items():
    np.testing.assert_array_equal(updates[path], -np.asarray(grad))

  schedule, optimizer = optim.from_config(config)
  model = models.build_model(config.model, num_classes=CLASSES)
  state = steps.initial_state(params, optimizer, trainable_lib.is_head)
  step = steps.make_train_step(
    losses.classifier_loss(model),
    optimizer,
    schedule,
    trainable_lib.is_head,
    axis_name=None,
  )
  batch = {
    'image': jax.random.normal(jax.random.key(2), (4, CROP, CROP, 3)),
    'label': jnp.arange(4) % CLASSES,
  }
  state, _ = jax.jit(step)(state, batch)
  after = flat(state.params)
  for path, value in flat(frozen).items():
    np.testing.assert_array_equal(after[path], value, err_msg=path)
  assert not np.array_equal(after['head/kernel'], flat(params)['head/kernel'])


@pytest.mark.parametrize('decay', [None, 0, 1, 1.0])
def test_off_builds_no_multipliers(decay):
  assert optim.multipliers_from_config(job(layer_decay=decay)) == (None, None)


@pytest.mark.parametrize('name', optim.OPTIMIZERS)
def test_off_by_default_the_updates_are_bit_identical(name):
  """The defaults build the optimizer the code built before these options:
  the same state and, over two steps, the same updates to the bit."""
  config = job(
    optimizer=name,
    base_lr=0.01,
    grad_norm_clip=1.0,
    weight_decay=0.1,
    optim_dtype='bfloat16',
  )
  params = params_of(config)
  schedule, optimizer = optim.from_config(config)
  inner = (
    optax.sgd(schedule, momentum=0.9, accumulator_dtype=jnp.bfloat16)
    if name == 'sgd'
    else optax.adamw(
      schedule,
      weight_decay=0.1,
      mu_dtype=jnp.bfloat16,
      mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p),
    )
  )
  before = optax.chain(optax.clip_by_global_norm(1.0), inner)
  states = [optimizer.init(params), before.init(params)]
  assert jax.tree.structure(states[0]) == jax.tree.structure(states[1])
  for seed in (1, 2):
    grads = gradients_like(params, seed)
    new, states[0] = optimizer.update(grads, states[0], params)
    old, states[1] = before.update(grads, states[1], params)
    jax.tree.map(np.testing.assert_array_equal, new, old)


# ------------------------------------------------------ regex multipliers


def test_the_first_matching_regex_wins_and_unmatched_leaves_get_one():
  lr_mults = (
    ('head/kernel', 3.0),
    ('head/.*', 5.0),  # head/bias only: head/kernel matched first.
    ('Transformer/encoderblock_1/.*', 0.25),
    ('Transformer/.*', 2.0),
  )
  config = job(lr_mults=lr_mults)
  params = params_of(config)
  grads = gradients_like(params)
  updates = flat(first_update(config, params, grads))

  def factor(path):
    if path == 'head/kernel':
      return 3.0
    if path == 'head/bias':
      return 5.0
    if path.startswith('Transformer/encoderblock_1/'):
      return 0.25
    return 2.0 if path.startswith('Transformer/') else 1.0

  for path, grad in flat(grads).items():
    expected = -np.asarray(grad) * np.float32(factor(path))
    np.testing.assert_array_equal(updates[path], expected, err_msg=path)


def test_lr_mults_multiply_the_layer_decay():
  config = job(layer_decay=DECAY, lr_mults=(('head/.*', 10.0),))
  lr_mults, _ = optim.multipliers_from_config(config)
  assert lr_mults('head/kernel') == 10.0
  assert lr_mults('embedding/kernel') == DECAY ** (LAYERS + 1)
  assert lr_mults('Transformer/encoderblock_0/LayerNorm_0/scale') == (
    DECAY**LAYERS
  )


def adamw_job(**overrides):
  """`job` with AdamW, weight decay 0.1 unless `overrides` say otherwise."""
  return job(**{'optimizer': 'adamw', 'weight_decay': 0.1, **overrides})


def test_wd_mults_scale_the_decay_term_alone():
  """With zero gradients AdamW's update is the decay alone: -lr * wd *
  factor * p on matrices, nothing on biases and norm scales."""
  config = adamw_job(wd_mults=(('head/.*', 0.0), ('.*/MlpBlock_0/.*', 3.0)))
  params = params_of(config)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates = flat(first_update(config, params, zeros))
  for path, p in flat(params).items():
    p = np.asarray(p)
    if p.ndim <= 1 or path.startswith('head/'):
      expected = np.zeros_like(p)
    else:
      factor = 3.0 if '/MlpBlock_0/' in path else 1.0
      expected = -(p * np.float32(0.1 * factor))
    np.testing.assert_allclose(updates[path], expected, rtol=1e-6, err_msg=path)


def test_wd_mults_leave_the_gradient_step_alone():
  """Factors of 1 give optax.adamw's updates exactly; factors of 0 give
  Adam's (no decay), the gradient's step unscaled."""
  params = params_of(adamw_job())
  grads = gradients_like(params)
  plain = flat(first_update(adamw_job(), params, grads))
  ones = flat(first_update(adamw_job(wd_mults=(('.*', 1.0),)), params, grads))
  jax.tree.map(np.testing.assert_array_equal, ones, plain)
  no_decay = flat(first_update(adamw_job(weight_decay=0.0), params, grads))
  zeros = flat(first_update(adamw_job(wd_mults=(('.*', 0.0),)), params, grads))
  jax.tree.map(np.testing.assert_array_equal, zeros, no_decay)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
  'overrides, match',
  [
    ({'lr_mults': (('head/(', 2.0),)}, r'config\.lr_mults: .head/\(. is not'),
    ({'wd_mults': (('.*', -1.0),)}, r'config\.wd_mults: .* multiplier >= 0'),
    ({'lr_mults': (('.*',),)}, r'config\.lr_mults: .* pair'),
    ({'wd_mults': (('.*', 2.0),)}, r"config\.wd_mults scales AdamW's"),
  ],
)
def test_bad_multipliers_are_config_errors(overrides, match):
  with pytest.raises(ConfigError, match=match):
    optim.check_config(job(**overrides))


def test_layer_decay_needs_a_vit():
  config = job(layer_decay=DECAY)
  config.model = models.MODEL_CONFIGS[
    'Mixer-Mini_4'
  ].copy_and_resolve_references()
  with pytest.raises(ConfigError, match=r'layer_decay=0.5 needs a ViT'):
    optim.check_config(config)


@pytest.mark.parametrize('decay', [-0.1, 1.5])
def test_layer_decay_out_of_range_is_a_config_error(decay):
  with pytest.raises(ConfigError, match=r'config\.layer_decay=.* \[0, 1\]'):
    config_checks.check_table(job(layer_decay=decay))


def test_old_records_resume_without_the_keys():
  config = job()
  record = results.config_record(config)
  old = {
    k: v
    for k, v in record.items()
    if k not in ('layer_decay', 'lr_mults', 'wd_mults')
  }
  assert results.config_changes(old, config) == []
  config.lr_mults = (('head/.*', 10.0),)
  assert [k for k, *_ in results.config_changes(old, config)] == ['lr_mults']


def test_adamw_decays_the_same_leaves_with_scanned_blocks():
  """A scanned encoder's stacked biases and norm scales are 2-D (a row per
  layer); AdamW leaves them undecayed, as it does each layer's 1-D ones,
  so scan changes nothing of what the optimizer computes."""
  unrolled = params_of(job(model_config()))
  scanned = params_of(job(model_config(scan=True)))
  stacked = flat(optim._decayed(scanned))  # noqa: SLF001
  per_layer = flat(optim._decayed(unrolled))  # noqa: SLF001
  for path, decayed in per_layer.items():
    if '/encoderblock_' in path:
      layer_path = re.sub(r'/encoderblock_\d+/', '/encoderblock/', path)
      assert stacked[layer_path] == decayed, path
    else:
      assert stacked[path] == decayed, path
  assert not stacked['Transformer/encoderblock/LayerNorm_0/scale']
  assert stacked['Transformer/encoderblock/MlpBlock_0/Dense_0/kernel']
