"""Rematerialised and scanned encoders, the dot_product_attention kernel, and
the one conversion between the per-layer and the scanned parameter layout
(`checkpoint.layer_stack`) that keeps files in per-layer names."""

import chex
import flax
import jax
import ml_collections
import numpy as np
import pytest

from tests import helpers
from vit_jax import checkpoint
from vit_jax import finetune
from vit_jax import models
from vit_jax import results
from vit_jax import trainable as trainable_lib
from vit_jax.attention import maps
from vit_jax.checkpoint import inspect
from vit_jax.checkpoint import layer_stack
from vit_jax.checkpoint import pretrained
from vit_jax.checkpoint import task_file
from vit_jax.errors import ConfigError
from vit_jax.finetune import methods
from vit_jax.finetune import serving

LAYERS = 2
SIDE = 32  # 4x4 patches of 8 and a class token: 17 tokens.
CLASSES = 5
DPA = 'dot_product_attention'


def model_config(**transformer):
  """A width-32, two-layer ViT; `transformer` sets encoder options."""
  return {
    'model_name': 'tiny',
    'patches': {'size': (8, 8)},
    'hidden_size': 32,
    'classifier': 'token',
    'transformer': {
      'num_layers': LAYERS,
      'mlp_dim': 64,
      'num_heads': 4,
      'dropout_rate': 0.1,
      'attention_dropout_rate': 0.0,
      **transformer,
    },
  }


def build(num_classes=CLASSES, **transformer):
  return models.build_model(
    model_config(**transformer), num_classes=num_classes
  )


@pytest.fixture(scope='module')
def images():
  return jax.random.normal(jax.random.key(0), (2, SIDE, SIDE, 3))


@pytest.fixture(scope='module')
def params(images):
  """The plain model's parameters (non-zero head: informative logits)."""
  return helpers.random_variables(build(), images)['params']


def logits_and_grads(model, params, images, train=False):
  """Logits and the gradient of a fixed linear function of them with
  respect to every parameter (dropout seeded alike for every model)."""
  weights = jax.random.normal(jax.random.key(1), (len(images), CLASSES))

  def loss(params):
    logits = model.apply(
      {'params': params},
      images,
      train=train,
      rngs={'dropout': jax.random.key(2)},
    )
    return (logits * weights).sum(), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return logits, grads


@pytest.fixture(scope='module')
def plain_run(params, images):
  return logits_and_grads(build(), params, images)


# ------------------------------------------------------------- the model


def primitives(model, params, images):
  """The names of the primitives in the jaxpr of the model's gradient."""
  jaxpr = jax.make_jaxpr(
    jax.grad(lambda p: model.apply({'params': p}, images, train=False).sum())
  )(params)
  return {eqn.primitive.name for eqn in jaxpr.eqns}


def test_remat_leaves_logits_and_gradients_unchanged(params, images, plain_run):
  model = build(remat=True)
  assert 'remat2' in primitives(model, params, images)
  assert 'remat2' not in primitives(build(), params, images)
  chex.assert_trees_all_close(
    logits_and_grads(model, params, images), plain_run
  )


def test_remat_in_training_draws_the_same_dropout(params, images):
  want = logits_and_grads(build(), params, images, train=True)
  got = logits_and_grads(
    build(remat=True, remat_policy='dots_saveable'), params, images, True
  )
  chex.assert_trees_all_close(got, want)


@pytest.mark.parametrize('remat', [False, True])
def test_scan_gives_the_per_layer_logits_and_gradients(
  params, images, plain_run, remat
):
  model = build(scan=True, remat=remat)
  logits, grads = logits_and_grads(
    model, layer_stack.stack_layers(params, LAYERS), images
  )
  assert layer_stack.is_stacked(grads)
  chex.assert_trees_all_close(
    (logits, layer_stack.unstack_layers(grads)), plain_run, atol=1e-5
  )


def test_scanned_parameters_are_one_module_stacked_over_the_layers():
  per_layer = table_params(build())
  scanned = table_params(build(scan=True))
  assert inspect.shapes(scanned) == inspect.shapes(
    layer_stack.stack_layers(per_layer, LAYERS)
  )
  shapes = inspect.shapes(scanned)
  assert shapes['Transformer/encoderblock/MlpBlock_0/Dense_0/kernel'] == (
    LAYERS,
    32,
    64,
  )
  assert not any('encoderblock_' in path for path in shapes)


def table_params(model):
  return pretrained.zero_params(model, SIDE)


@pytest.fixture(name='fused_calls')
def fixture_fused_calls(monkeypatch):
  """Counts the model's calls of `jax.nn.dot_product_attention`."""
  calls = []
  fused = jax.nn.dot_product_attention

  def spy(*args, **kwargs):
    calls.append(args[0].shape)
    return fused(*args, **kwargs)

  monkeypatch.setattr(jax.nn, 'dot_product_attention', spy)
  return calls


def test_dot_product_attention_equals_the_explicit_softmax(
  params, images, plain_run, fused_calls
):
  got = logits_and_grads(build(attention=DPA), params, images)
  # One call per layer, on [batch, tokens, heads, head_dim].
  assert fused_calls == [(2, 17, 4, 8)] * LAYERS
  chex.assert_trees_all_close(got, plain_run, atol=1e-5, rtol=1e-5)


def test_attention_maps_of_a_scanned_fused_model_are_the_plain_ones(
  params, images, fused_calls
):
  """Maps run the explicit attention: the fused kernel has no weights."""
  scanned = build(scan=True, remat=True, attention=DPA)
  chex.assert_trees_all_close(
    maps.attention_weights(
      scanned, layer_stack.stack_layers(params, LAYERS), images
    ),
    maps.attention_weights(build(), params, images),
    atol=1e-6,
  )
  assert not fused_calls


def test_unknown_remat_policy_is_a_config_error(images):
  with pytest.raises(ConfigError, match='remat_policy=.*nothing_saveable'):
    jax.eval_shape(
      lambda x: build(remat=True, remat_policy='nothing').init(
        jax.random.key(0), x, train=False
      ),
      images,
    )


def test_fused_attention_with_attention_dropout_cannot_train(images):
  model = build(attention=DPA, attention_dropout_rate=0.1)
  variables = jax.eval_shape(
    lambda x: model.init(jax.random.key(0), x, train=False), images
  )  # Evaluation drops nothing out: it runs.
  with pytest.raises(ConfigError, match='attention_dropout_rate=0.1'):
    jax.eval_shape(
      lambda v, x: model.apply(
        v, x, train=True, rngs={'dropout': jax.random.key(1)}
      ),
      variables,
      images,
    )
  with pytest.raises(ConfigError, match='attention=.fused.; choose one of'):
    jax.eval_shape(
      lambda x: build(attention='fused').init(
        jax.random.key(0), x, train=False
      ),
      images,
    )


def test_the_options_are_config_keys_that_old_records_resume_without():
  """Every registered ViT holds them (a locked config takes only existing
  keys from the command line); a run recorded before them resumes, and
  remat may change on resume while scan may not."""
  options = {
    'remat': False,
    'remat_policy': 'nothing_saveable',
    'scan': False,
    'attention': 'explicit',
  }
  for name, config in models.MODEL_CONFIGS.items():
    if models.model_class(name) is models.VisionTransformer:
      transformer = config.transformer
      assert {k: transformer[k] for k in options} == options, name
  config = ml_collections.ConfigDict(
    {'model': models.MODEL_CONFIGS['ViT-B_16'].to_dict()}
  )
  old_record = {
    key: value
    for key, value in results.config_record(config).items()
    if key.rpartition('.')[2] not in options
  }
  assert results.config_changes(old_record, config) == []
  config.model.transformer.remat = True
  config.model.transformer.remat_policy = 'dots_saveable'
  assert results.config_changes(old_record, config) == []
  config.model.transformer.scan = True
  assert results.config_changes(old_record, config) == [
    ('model.transformer.scan', False, True)
  ]


# ------------------------------------------------------ the layout change


def test_unstack_of_stack_is_exact_for_any_mapping(params):
  stacked = layer_stack.stack_layers(params, LAYERS)
  block = stacked['Transformer']['encoderblock']
  np.testing.assert_array_equal(
    block['MlpBlock_0']['Dense_1']['bias'][1],
    params['Transformer']['encoderblock_1']['MlpBlock_0']['Dense_1']['bias'],
  )
  chex.assert_trees_all_equal(layer_stack.unstack_layers(stacked), params)
  assert layer_stack.stack_layers(stacked) is not stacked  # A new tree...
  chex.assert_trees_all_equal(layer_stack.stack_layers(stacked), stacked)

  numpy_tree = flax.core.freeze(
    {'params': jax.tree.map(np.asarray, dict(params))}
  )
  round_trip = layer_stack.unstack_layers(layer_stack.stack_layers(numpy_tree))
  assert isinstance(round_trip, flax.core.FrozenDict)
  assert isinstance(
    round_trip['params']['Transformer']['encoderblock_0']['LayerNorm_0'][
      'scale'
    ],
    np.ndarray,
  )
  chex.assert_trees_all_equal(round_trip, numpy_tree)


def test_stacking_needs_blocks_0_to_n_minus_1(params):
  gap = dict(params['Transformer'])
  gap['encoderblock_2'] = gap.pop('encoderblock_1')
  with pytest.raises(ValueError, match=r'blocks \[0, 2\]'):
    layer_stack.stack_layers({'Transformer': gap})
  with pytest.raises(ValueError, match='encoderblock_0 .. encoderblock_2'):
    layer_stack.stack_layers(params, num_layers=3)
  odd = jax.tree.map(lambda x: x, dict(params['Transformer']))
  odd['encoderblock_1'] = {'LayerNorm_0': odd['encoderblock_1']['LayerNorm_0']}
  with pytest.raises(ValueError, match='other parameters than'):
    layer_stack.stack_layers(odd)


def test_to_model_layout_follows_the_config(params):
  stacked = layer_stack.to_model_layout(params, model_config(scan=True))
  chex.assert_trees_all_equal(stacked, layer_stack.stack_layers(params, LAYERS))
  chex.assert_trees_all_equal(
    layer_stack.to_model_layout(stacked, model_config()), params
  )


def write_published_npz(path):
  """The tiny model as Google publishes ViTs: pre-linen keys, random."""
  shapes = helpers.vit_tree_shapes(
    hidden=32,
    mlp=64,
    heads=4,
    layers=LAYERS,
    patch=8,
    tokens=17,
    num_classes=CLASSES,
  )
  rng = np.random.default_rng(0)
  arrays = {
    helpers.pre_linen(key): rng.standard_normal(shape).astype(np.float32)
    for key, shape in shapes.items()
  }
  assert 'Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel' in arrays
  np.savez(path, **arrays)
  return arrays


def test_a_google_npz_loads_into_a_scanned_model_and_saves_back_identical(
  tmp_path,
):
  source = str(tmp_path / 'google.npz')
  arrays = write_published_npz(source)
  model = build(scan=True)
  loaded = checkpoint.load_pretrained(
    pretrained_path=source,
    init_params=table_params(model),
    model_config=model_config(scan=True),
    reset_head=False,
  )
  chex.assert_trees_all_equal(
    loaded, layer_stack.stack_layers(checkpoint.load(source), LAYERS)
  )
  saved = str(tmp_path / 'saved.npz')
  checkpoint.save(saved, loaded)
  with np.load(saved) as written:
    assert sorted(written.files) == sorted(arrays)
    for key, value in arrays.items():
      np.testing.assert_array_equal(written[key], value, err_msg=key)


def test_a_google_npz_adapts_to_a_scanned_model_as_to_a_plain_one(tmp_path):
  """At 48 px the position embeddings are resized; with 10 classes the
  head is reset."""
  source = str(tmp_path / 'google.npz')
  write_published_npz(source)

  def load(**transformer):
    return checkpoint.load_pretrained(
      pretrained_path=source,
      init_params=pretrained.zero_params(build(10, **transformer), 48),
      model_config=model_config(**transformer),
      log=lambda _: None,
    )

  scanned, plain = load(scan=True), load()
  chex.assert_shape(
    scanned['Transformer']['posembed_input']['pos_embedding'], (1, 37, 32)
  )
  chex.assert_trees_all_equal(scanned, layer_stack.stack_layers(plain, LAYERS))


# ------------------------------------------ injection, task files, serving


INJECTIONS = {
  'ia3': finetune.Injection(
    methods.get_method('ia3', {}), ('key', 'value', 'mlp_hidden')
  ),
  'lora': finetune.Injection(
    methods.get_method('lora', {'rank': 2, 'alpha': 2.0}), ('query', 'value')
  ),
}


@pytest.mark.parametrize('method', sorted(INJECTIONS))
def test_an_injected_scanned_model_computes_and_folds_as_the_plain_one(
  images, method
):
  injection = INJECTIONS[method]
  plain = finetune.InjectedModel(build(), injection)
  scanned = finetune.InjectedModel(build(scan=True), injection)
  params = helpers.random_variables(plain, images)['params']
  stacked = layer_stack.stack_layers(params, LAYERS)
  assert inspect.shapes(stacked) == inspect.shapes(
    table_params(scanned)
  )  # The adapters are stacked inside the scanned block.
  chex.assert_trees_all_close(
    scanned.apply({'params': stacked}, images, train=False),
    plain.apply({'params': params}, images, train=False),
    atol=1e-5,
  )
  chex.assert_trees_all_close(
    injection.fold(stacked),
    layer_stack.stack_layers(injection.fold(params), LAYERS),
  )


@pytest.mark.parametrize('method', sorted(INJECTIONS))
def test_a_scanned_models_task_file_is_the_plain_models(
  tmp_path, images, method
):
  injection = INJECTIONS[method]
  params = helpers.random_variables(
    finetune.InjectedModel(build(), injection), images
  )['params']
  trained = lambda path: (
    trainable_lib.is_head(path) or injection.is_trained(path)
  )
  files = {}
  for name, tree in (
    ('plain', params),
    ('scanned', layer_stack.stack_layers(params, LAYERS)),
  ):
    files[name] = str(tmp_path / f'{name}.npz')
    task_file.save_task_params(files[name], tree, trained)
  assert task_file.read_record(files['scanned']) == task_file.read_record(
    files['plain']
  )
  with np.load(files['plain']) as plain, np.load(files['scanned']) as scanned:
    assert sorted(scanned.files) == sorted(plain.files)
    assert any(
      key.endswith(methods.METHODS[method].param_names[0])
      for key in plain.files
    )
    for key in plain.files:
      np.testing.assert_array_equal(scanned[key], plain[key], err_msg=key)

  base = trainable_lib.partition(params, trained)[1]
  stacked_base = layer_stack.stack_layers(base, LAYERS)
  chex.assert_trees_all_equal(
    task_file.load_task_params(files['plain'], stacked_base),
    layer_stack.stack_layers(params, LAYERS),
  )


def test_a_scanned_task_serves_and_exports_per_layer_names(
  tmp_path, params, images, plain_run
):
  """A full-mode task file of a scanned run: its model is rebuilt scanned,
  and its export is the plain checkpoint."""
  path = str(tmp_path / 'task.npz')
  task_file.save_task_params(
    path,
    layer_stack.stack_layers(params, LAYERS),
    lambda _: True,
    metadata={
      'model': model_config(scan=True),
      'finetune': {
        'mode': 'full',
        'trainable': '',
        'head': {'type': 'linear'},
      },
      'crop': SIDE,
      'num_classes': CLASSES,
    },
  )
  (task,) = serving.load_tasks(None, [path]).values()
  assert layer_stack.is_stacked(task.params)
  chex.assert_trees_all_close(task.logits(images), plain_run[0], atol=1e-5)
  exported, plain = str(tmp_path / 'out.npz'), str(tmp_path / 'plain.npz')
  serving.export(task, exported)
  checkpoint.save(plain, params)
  with np.load(exported) as got, np.load(plain) as want:
    assert sorted(got.files) == sorted(want.files)
    for key in want.files:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_a_predicate_on_stacked_paths_saves_every_layers_leaves(
  tmp_path, params
):
  """As a scanned run's `finetune.trainable` sees its paths."""
  path = str(tmp_path / 'task.npz')
  trained = lambda path: path.startswith('Transformer/encoderblock/LayerNorm')
  task_file.save_task_params(
    path, layer_stack.stack_layers(params, LAYERS), trained
  )
  with np.load(path) as saved:
    assert sorted(k for k in saved.files if '__meta__' not in k) == sorted(
      f'Transformer/encoderblock_{layer}/LayerNorm_{norm}/{leaf}'
      for layer in range(LAYERS)
      for norm in (0, 1)
      for leaf in ('scale', 'bias')
    )
