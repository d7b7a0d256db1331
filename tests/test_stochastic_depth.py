"""Stochastic depth (`config.model.transformer.stochastic_depth`): each
block's residual branches dropped per example in training, at a rate rising
linearly over the blocks, unbiased, the identity at evaluation, with no
parameter of its own, plain, scanned and rematerialised."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tests import helpers
from vit_jax import config_checks
from vit_jax import models
from vit_jax import results
from vit_jax.checkpoint import layer_stack
from vit_jax.errors import ConfigError
from vit_jax.models import swin
from vit_jax.models import vit

LAYERS = 4
RATE = 0.6
SIDE = 8  # 2x2 patches of 4 and a class token: 5 tokens.
CLASSES = 3
# Encoder options under test: plain, scanned, rematerialised, both.
LAYOUTS = [
  pytest.param({}, id='plain'),
  pytest.param({'scan': True}, id='scan'),
  pytest.param({'remat': True}, id='remat'),
  pytest.param({'scan': True, 'remat': True}, id='scan_remat'),
]


def build(stochastic_depth=RATE, **transformer):
  """A width-16 ViT of `LAYERS` blocks, without dropout (so the branches
  change only by stochastic depth)."""
  config = {
    'model_name': 'tiny',
    'patches': {'size': (4, 4)},
    'hidden_size': 16,
    'classifier': 'token',
    'transformer': {
      'num_layers': LAYERS,
      'mlp_dim': 32,
      'num_heads': 2,
      'dropout_rate': 0.0,
      'attention_dropout_rate': 0.0,
      'stochastic_depth': stochastic_depth,
      **transformer,
    },
  }
  return models.build_model(config, num_classes=CLASSES)


def images(count, seed=0):
  return jax.random.normal(jax.random.key(seed), (count, SIDE, SIDE, 3))


@pytest.fixture(scope='module')
def params():
  """The per-layer model's parameters (non-zero head)."""
  return helpers.random_variables(build(), images(2))['params']


@pytest.fixture(scope='module')
def stacked(params):
  """The same parameters in the scanned layout."""
  return layer_stack.stack_layers(params, LAYERS)


def params_for(layout, params, stacked):
  return stacked if layout.get('scan') else params


def train_apply(model, params, x, key=1, **kwargs):
  return model.apply(
    {'params': params},
    x,
    train=True,
    rngs={'dropout': jax.random.key(key)},
    **kwargs,
  )


# ------------------------------------------------------------ the operation


def test_drop_path_keeps_the_expectation_of_a_branch():
  """Over n draws (one per example of a batch of copies) the mean equals
  the branch within 5 standard errors, which shrink as 1/sqrt(n); each
  example is dropped whole or kept scaled by 1 / (1 - rate)."""
  rate, draws = 0.3, 20_000
  branch = jax.random.normal(jax.random.key(0), (3, 4))
  x = jnp.broadcast_to(branch, (draws, 3, 4))
  out = vit.DropPath().apply(
    {}, x, rate, deterministic=False, rngs={'dropout': jax.random.key(1)}
  )
  out = np.asarray(out)
  dropped = np.all(out == 0, axis=(1, 2))
  np.testing.assert_allclose(
    out[~dropped],
    np.broadcast_to(branch / (1 - rate), out[~dropped].shape),
    rtol=1e-6,
  )
  assert abs(dropped.mean() - rate) < 5 * np.sqrt(rate * (1 - rate) / draws)
  standard_error = np.abs(branch) * np.sqrt(rate / (1 - rate) / draws)
  np.testing.assert_array_less(
    np.abs(out.mean(0) - branch), 5 * standard_error + 1e-7
  )


def test_drop_path_is_the_identity_when_deterministic():
  x = jax.random.normal(jax.random.key(0), (4, 3, 2))
  out = vit.DropPath().apply({}, x, 0.5, deterministic=True)
  np.testing.assert_array_equal(out, x)


def test_the_rates_rise_linearly_from_zero_to_the_rate():
  np.testing.assert_allclose(vit.drop_path_rates(0.3, 4), [0, 0.1, 0.2, 0.3])
  np.testing.assert_array_equal(vit.drop_path_rates(0.3, 1), [0.0])
  np.testing.assert_array_equal(vit.drop_path_rates(0.0, 3), [0, 0, 0])


# ------------------------------------------------------------- the encoder


@pytest.mark.parametrize('layout', LAYOUTS)
def test_the_parameter_tree_is_unchanged(layout):
  x = images(2)

  def shapes(model):
    variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), x, train=False)
    )
    return jax.tree.map(lambda s: (s.shape, s.dtype), variables)

  assert shapes(build(**layout)) == shapes(build(0.0, **layout))


@pytest.mark.parametrize('layout', LAYOUTS)
def test_evaluation_is_the_model_without_it(layout, params, stacked):
  p, x = params_for(layout, params, stacked), images(8)
  with_it = build(**layout).apply({'params': p}, x, train=False)
  without = build(0.0, **layout).apply({'params': p}, x, train=False)
  np.testing.assert_array_equal(with_it, without)


@pytest.mark.parametrize('layout', LAYOUTS)
def test_rate_zero_trains_as_before(layout, params, stacked):
  """Rate 0 draws nothing: training computes what a model built without
  the key computes, dropout masks included."""
  p, x = params_for(layout, params, stacked), images(8)
  model = build(0.0, dropout_rate=0.1, **layout)
  old = model.clone(
    transformer={
      k: v for k, v in model.transformer.items() if k != 'stochastic_depth'
    }
  )
  np.testing.assert_array_equal(
    train_apply(model, p, x), train_apply(old, p, x)
  )


def _drop_frequencies(model, params, x):
  """`[layers, 2]`: the share of examples whose attention (0) and MLP (1)
  branch each block dropped (a `DropPath` output of zeros)."""
  _, state = train_apply(
    model,
    params,
    x,
    capture_intermediates=lambda module, _: isinstance(module, vit.DropPath),
    mutable=['intermediates'],
  )
  blocks = state['intermediates']['Transformer']
  frequencies = np.zeros((LAYERS, 2))
  for i in range(LAYERS):
    for branch in (0, 1):
      if vit.SCANNED_BLOCK in blocks:  # Recorded stacked over the layers.
        drop_path = blocks[vit.SCANNED_BLOCK][f'DropPath_{branch}']
        out = drop_path['__call__'][0][i]
      elif f'encoderblock_{i}' in blocks:
        block = blocks[f'encoderblock_{i}']
        out = block[f'DropPath_{branch}']['__call__'][0]
      else:  # A block at rate 0 (the first) has no DropPath.
        continue
      dropped = np.all(np.asarray(out).reshape(len(x), -1) == 0, axis=1)
      frequencies[i, branch] = dropped.mean()
  return frequencies


@pytest.mark.parametrize('layout', LAYOUTS)
def test_each_block_drops_at_its_linear_rate(layout, params, stacked):
  """Block i drops each branch of an example at RATE * i / (L - 1): the
  first block never, the last at RATE; per example, not per batch."""
  n = 2000
  frequencies = _drop_frequencies(
    build(**layout), params_for(layout, params, stacked), images(n, seed=3)
  )
  expected = vit.drop_path_rates(RATE, LAYERS)
  tolerance = 5 * np.sqrt(expected * (1 - expected) / n) + 1e-9
  for branch in (0, 1):
    np.testing.assert_array_less(
      np.abs(frequencies[:, branch] - expected), tolerance + 1e-3
    )
  assert frequencies[0].tolist() == [0.0, 0.0]


def test_rematerialised_blocks_drop_what_plain_blocks_drop(params, stacked):
  """remat changes memory, not the masks: the same training loss and
  gradients, per-layer and scanned."""
  x = images(16)

  def loss_and_grads(model, p):
    return jax.jit(
      jax.value_and_grad(lambda p: train_apply(model, p, x).sum())
    )(p)

  for p, scan in ((params, False), (stacked, True)):
    plain = loss_and_grads(build(scan=scan), p)
    remat = loss_and_grads(build(scan=scan, remat=True), p)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      plain,
      remat,
    )


def test_training_drops_differ_from_evaluation(params):
  """With the rate on, training outputs differ from evaluation's for some
  examples, and gradients flow."""
  model, x = build(), images(16)
  train = train_apply(model, params, x)
  evaluation = model.apply({'params': params}, x, train=False)
  assert not np.allclose(train, evaluation)
  grads = jax.grad(lambda p: train_apply(model, p, x).sum())(params)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


# ----------------------------------------------------------------- Swin


def test_swin_takes_it_without_new_parameters():
  def build_swin(rate):
    return swin.SwinTransformer(
      num_classes=CLASSES,
      patch_size=2,
      embed_dim=8,
      depths=(2, 2),
      num_heads=(1, 2),
      window_size=2,
      stochastic_depth=rate,
    )

  x = images(8)
  variables = helpers.random_variables(build_swin(0.0), x)
  shapes = jax.eval_shape(
    lambda: build_swin(0.5).init(jax.random.key(0), x, train=False)
  )
  assert jax.tree.structure(shapes) == jax.tree.structure(variables)
  np.testing.assert_array_equal(
    build_swin(0.5).apply(variables, x, train=False),
    build_swin(0.0).apply(variables, x, train=False),
  )
  train = build_swin(0.5).apply(
    variables, x, train=True, rngs={'dropout': jax.random.key(1)}
  )
  assert not np.allclose(
    train, build_swin(0.0).apply(variables, x, train=False)
  )


# ---------------------------------------------------------------- config


def test_every_registered_model_with_blocks_holds_the_key():
  for name, config in models.MODEL_CONFIGS.items():
    cls = models.model_class(name)
    if cls is models.VisionTransformer:
      assert config.transformer.stochastic_depth == 0.0, name
    elif cls is swin.SwinTransformer:
      assert config.stochastic_depth == 0.0, name


def test_old_records_resume_and_the_rate_is_checked():
  config = ml_collections.ConfigDict(
    {'model': models.MODEL_CONFIGS['ViT-B_16'].to_dict()}
  )
  old_record = {
    k: v
    for k, v in results.config_record(config).items()
    if k != 'model.transformer.stochastic_depth'
  }
  assert results.config_changes(old_record, config) == []
  config.model.transformer.stochastic_depth = 0.1
  assert results.config_changes(old_record, config) == [
    ('model.transformer.stochastic_depth', 0.0, 0.1)
  ]
  config.model.transformer.stochastic_depth = 1.0
  with pytest.raises(
    ConfigError, match=r'stochastic_depth=1.0 must be .*\[0, 1\)'
  ):
    config_checks.check_table(config)
