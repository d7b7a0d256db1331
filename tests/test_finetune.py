"""Fine-tuning modes: labels, injection methods, frozen weights, task files."""

import dataclasses
import json
import os

from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers
from vit_jax import checkpoint
from vit_jax import finetune
from vit_jax import losses
from vit_jax import models
from vit_jax import paths
from vit_jax import results as results_lib
from vit_jax import steps as step_lib
from vit_jax import train as train_lib
from vit_jax import trainable as trainable_lib
from vit_jax.checkpoint import inspect
from vit_jax.checkpoint import train_state
from vit_jax.errors import ConfigError
from vit_jax.finetune import methods
from vit_jax.finetune import serving
from vit_jax.models import table

CROP = helpers.CROP
METHODS = ('ia3', 'ssf', 'lora', 'bitfit')
FOLDABLE = ('ia3', 'ssf', 'lora')


LAYERS = 2  # Of helpers.micro_model_config().


def ft_config(mode='full', method='ia3', **overrides):
  """`helpers.job_config` (two-layer ViT-Micro_4 at 8x8) in a fine-tuning
  mode, 4 steps."""
  config = helpers.four_step_config()
  config.finetune.mode = mode
  config.finetune.injection.method = method
  config.update(overrides)
  return config


def micro(**overrides):
  """The base model of `ft_config`."""
  return models.build_model(ft_config().model, **overrides)


def images(count=4, crop=CROP, seed=0):
  return (
    np.random.default_rng(seed)
    .uniform(-1, 1, [count, crop, crop, 3])
    .astype(np.float32)
  )


def init(model, crop=CROP):
  return model.init(
    jax.random.key(0), jnp.zeros([1, crop, crop, 3]), train=False
  )['params']


def abstract_params(model, crop):
  return table.abstract_variables(model, crop)['params']


# ---------------------------------------------------------- the model tree


def test_full_mode_leaves_the_base_tree_unchanged():
  model = finetune.build_model(ft_config('full'), num_classes=10)
  base = micro(num_classes=10)
  assert isinstance(model, nn.Module)
  assert inspect.shapes(abstract_params(model, CROP)) == inspect.shapes(
    abstract_params(base, CROP)
  )


class InjectedInitTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*METHODS)
  def test_injected_model_at_init_computes_exactly_the_base(self, method):
    base = micro(num_classes=10)
    injected = finetune.build_model(ft_config('injection', method), 10)
    base_params = helpers.random_variables(base, images())['params']
    added, _ = trainable_lib.partition(
      init(injected), injected.injection.is_added
    )
    apply_injected = self.variant(
      lambda p, x: injected.apply({'params': p}, x, train=False)
    )
    apply_base = self.variant(
      lambda p, x: base.apply({'params': p}, x, train=False)
    )
    chex.assert_trees_all_equal(
      apply_injected(trainable_lib.combine(base_params, added), images()),
      apply_base(base_params, images()),
    )


def test_added_parameters_sit_inside_their_target_layers():
  config = ft_config('injection', 'ia3')
  config.finetune.injection.targets = 'query,out'
  shapes = inspect.shapes(
    abstract_params(finetune.build_model(config, 10), CROP)
  )
  added = {p: s for p, s in shapes.items() if p.endswith('ia3_scale')}
  attention = 'Transformer/encoderblock_{}/MultiHeadDotProductAttention_0'
  assert added == {
    **{
      f'{attention.format(i)}/query/ia3_scale': (2, 32) for i in range(LAYERS)
    },
    **{f'{attention.format(i)}/out/ia3_scale': (64,) for i in range(LAYERS)},
  }


def vit_ti16_counts(method):
  """Trainable values of ViT-Ti/16 (D=192, MLP 768, 12 layers, 10 classes),
  written from the methods' definitions, not from the code."""
  d, mlp, layers, head = 192, 768, 12, 192 * 10 + 10
  linear_outputs = 4 * d + mlp + d  # q, k, v, out, mlp_hidden, mlp_output
  norms = 2 * d  # two LayerNorms per layer; encoder_norm counted apart
  return (
    head
    + {
      'ia3': layers * (d + d + mlp),
      'ssf': 2 * (layers * (linear_outputs + norms) + d),
      'lora': layers * 2 * (d * 8 + 8 * d),
      'bitfit': layers * (linear_outputs + norms) + d,
    }[method]
  )


@pytest.mark.parametrize('method', METHODS)
def test_trainable_counts_of_each_method(method):
  config = ft_config('injection', method)
  config.model = models.MODEL_CONFIGS['ViT-Ti_16'].copy_and_resolve_references()
  fine = finetune.from_config(config.finetune)
  params = abstract_params(finetune.build_model(config, 10), 224)
  assert trainable_lib.count(params, fine.is_trainable) == vit_ti16_counts(
    method
  )
  base_total = 5_526_346  # ViT-Ti/16 with a 10-class head.
  added = sum(
    int(np.prod(s))
    for p, s in inspect.shapes(params).items()
    if fine.is_added(p)
  )
  assert trainable_lib.count(params) == base_total + added


def test_head_modes_train_only_the_head():
  config = ft_config('head')
  params = init(finetune.build_model(config, 10))
  assert (
    trainable_lib.count(
      params, finetune.from_config(config.finetune).is_trainable
    )
    == 64 * 10 + 10
  )

  config.finetune.head.type = 'mlp'
  config.finetune.head.mlp_dim = 32
  params = init(finetune.build_model(config, 10))
  assert inspect.shapes(params['head']) == {
    'hidden/kernel': (64, 32),
    'hidden/bias': (32,),
    'out/kernel': (32, 10),
    'out/bias': (10,),
  }
  assert trainable_lib.count(
    params, finetune.from_config(config.finetune).is_trainable
  ) == (64 * 32 + 32 + 32 * 10 + 10)


def test_trainable_patterns_add_leaves_to_a_freezing_mode():
  """`config.finetune.trainable`: head plus every LayerNorm (not the final
  encoder_norm, which the pattern does not match)."""
  config = ft_config('head')
  config.finetune.trainable = '.*/LayerNorm_.*'
  fine = finetune.from_config(config.finetune)
  params = init(finetune.build_model(config, 10))
  trained = [p for p in inspect.flatten(params) if fine.is_trainable(p)]
  assert sorted(trained) == sorted(
    ['head/kernel', 'head/bias']
    + [
      f'Transformer/encoderblock_{i}/LayerNorm_{n}/{leaf}'
      for i in range(LAYERS)
      for n in (0, 1)
      for leaf in ('scale', 'bias')
    ]
  )
  fine.check(params)  # Every pattern matches something.


@pytest.mark.parametrize(
  'trainable,mode,message',
  [
    (
      'head/(',
      'head',
      r"config.finetune.trainable: 'head/\(' is not a "
      'regular expression',
    ),
    ('.*/NoSuchLayer/.*', 'head', 'NoSuchLayer.*match no parameter'),
    (
      '.*/LayerNorm_.*',
      'full',
      "has no effect with config.finetune.mode='full'",
    ),
  ],
)
def test_bad_trainable_patterns_are_config_errors(trainable, mode, message):
  config = ft_config(mode)
  config.finetune.trainable = trainable
  with pytest.raises(ConfigError, match=message):
    fine = finetune.from_config(config.finetune)
    fine.check(init(finetune.build_model(config, 10)))


@pytest.mark.parametrize(
  'change,message',
  [
    ({'mode': 'lora'}, r"mode='lora'; choose one of \('full'"),
    ({'injection.method': 'adapterx'}, "Unknown injection method 'adapterx'"),
    (
      {'injection.targets': 'key,keys'},
      r"Unknown injection target\(s\) \['keys'\]",
    ),
    (
      {'injection.method': 'lora', 'injection.targets': 'layernorm'},
      'lora adapts weight matrices',
    ),
    ({'injection.method': 'lora', 'injection.rank': 0}, 'LoRA needs >= 1'),
    ({'head.type': 'deep'}, r"head.type='deep'; choose one of \('linear'"),
  ],
)
def test_bad_fine_tuning_configs_name_the_key(change, message):
  config = ft_config('injection')
  for key, value in change.items():
    *parents, leaf = key.split('.')
    node = config.finetune
    for part in parents:
      node = node[part]
    node[leaf] = value
  with pytest.raises(ConfigError, match=message):
    finetune.build_model(config, 10)


def test_targets_absent_from_the_model_are_an_error():
  config = ft_config('injection', 'ia3')
  config.model = models.MODEL_CONFIGS[
    'Mixer-Mini_4'
  ].copy_and_resolve_references()
  config.finetune.injection.targets = 'query,mlp_hidden'
  with pytest.raises(ValueError, match=r"targets \['query'\] match no layer"):
    init(finetune.build_model(config, 10))


def test_a_new_method_is_one_registered_class():

  @dataclasses.dataclass(frozen=True)
  class Shift(methods.Method):
    name = 'test_shift'
    default_targets = ('mlp_output',)
    param_names = ('test_shift',)

    def inject(self, module, inputs, outputs):
      shift = module.param(
        'test_shift', nn.initializers.ones, methods.output_shape(module, inputs)
      )
      return outputs + shift

  methods.register(Shift)
  try:
    params = init(
      finetune.build_model(ft_config('injection', 'test_shift'), 10)
    )
    shifted = [p for p in inspect.flatten(params) if p.endswith('test_shift')]
    assert shifted == [
      f'Transformer/encoderblock_{i}/MlpBlock_0/Dense_1/test_shift'
      for i in range(LAYERS)
    ]
    with pytest.raises(ValueError, match='already registered'):
      methods.register(Shift)
  finally:
    del methods.METHODS['test_shift']


# ------------------------------------------------- optimizer and train step


@pytest.mark.parametrize('optimizer', ['sgd', 'adamw'])
def test_optimizer_state_covers_only_trainable_leaves(optimizer):
  config = ft_config('injection', 'lora', optimizer=optimizer)
  setup = helpers.create_setup(config, num_classes=10)
  trainable = trainable_lib.count(setup.state.params, setup.trainable)
  state_values = sum(
    x.size for x in jax.tree.leaves(setup.state.opt_state) if x.ndim
  )  # Leaves a step counter out.
  moments = 1 if optimizer == 'sgd' else 2
  assert state_values == moments * trainable


def run_steps(setup, steps=5, seed=0):
  """`steps` train steps of `setup` on one device with random batches.

  Five steps, so that LoRA's A moves: the zero head must move first (step 1,
  step 0's learning rate is 0), then B (step 2), then A (step 3).
  """
  train_step = step_lib.data_parallel(
    step_lib.make_train_step(
      losses.classifier_loss(setup.model),
      setup.optimizer,
      setup.schedule,
      setup.trainable,
    ),
    devices=jax.local_devices()[:1],
  )
  state = step_lib.replicate(setup.state, jax.local_devices()[:1])
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    batch = {
      'image': images(8, seed=int(rng.integers(1 << 30)))[None],
      'label': rng.integers(0, 10, [1, 8]).astype(np.int32),
    }
    state, metrics = train_step(state, batch)
    assert np.isfinite(metrics['loss']).all()
  return step_lib.unreplicate(state)


@pytest.mark.parametrize(
  'mode,method,patterns',
  [
    ('head', 'ia3', ''),
    ('head', 'ia3', '.*/LayerNorm_1/.*'),
    ('injection', 'ia3', ''),
    ('injection', 'ssf', ''),
    ('injection', 'lora', ''),
    ('injection', 'bitfit', ''),
  ],
)
def test_steps_change_every_trainable_leaf_and_no_frozen_bit(
  mode, method, patterns
):
  config = ft_config(mode, method)
  config.finetune.trainable = patterns
  setup = helpers.create_setup(config, num_classes=10)
  before = jax.device_get(setup.state.params)
  after = jax.device_get(run_steps(setup).params)
  trainable_before, frozen_before = trainable_lib.partition(
    before, setup.trainable
  )
  trainable_after, frozen_after = trainable_lib.partition(
    after, setup.trainable
  )
  chex.assert_trees_all_equal(frozen_after, frozen_before)
  unchanged = [
    path
    for path, value in inspect.flatten(trainable_after).items()
    if np.array_equal(value, inspect.flatten(trainable_before)[path])
  ]
  assert not unchanged
  assert inspect.flatten(frozen_before)  # The mode does freeze something.
  if patterns:
    assert any(
      'LayerNorm_1' in path for path in inspect.flatten(trainable_before)
    )


def count_matmuls(jaxpr) -> int:
  """dot_general and convolution equations, including nested jaxprs."""
  total = 0
  for eqn in jaxpr.eqns:
    total += eqn.primitive.name in ('dot_general', 'conv_general_dilated')
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          total += count_matmuls(inner)
  return total


def test_backward_pass_computes_no_frozen_weight_gradient():
  """Head-only: the step is the forward pass plus the head's weight gradient.

  Counted in the traced step (before any compiler dead-code elimination),
  so frozen gradients are not even asked for.
  """
  batch = {
    'image': jnp.zeros([1, 8, CROP, CROP, 3]),
    'label': jnp.zeros([1, 8], jnp.int32),
  }
  counts = {}
  for mode in ('full', 'injection', 'head'):
    setup = helpers.create_setup(ft_config(mode, 'ia3'), num_classes=10)
    step = step_lib.make_train_step(
      losses.classifier_loss(setup.model),
      setup.optimizer,
      setup.schedule,
      setup.trainable,
    )
    counts[mode] = count_matmuls(
      jax.make_jaxpr(jax.vmap(step, axis_name=step_lib.AXIS))(
        jax.tree.map(lambda x: x[None], setup.state), batch
      ).jaxpr
    )
  forward = count_matmuls(
    jax.make_jaxpr(
      lambda p, x: setup.model.apply({'params': p}, x, train=False)
    )(setup.state.params, batch['image'][0]).jaxpr
  )
  assert counts['head'] == forward + 1
  assert forward + 1 < counts['injection'] < counts['full']
  assert counts['full'] > 2 * forward


# ------------------------------------------------------------ folding


@pytest.mark.parametrize('method', FOLDABLE)
def test_folded_plain_model_gives_the_injected_logits(method):
  injected = finetune.build_model(ft_config('injection', method), 10)
  params = helpers.random_variables(injected, images())['params']
  folded = injected.injection.fold(params)
  base = micro(num_classes=10)
  assert inspect.shapes(folded) == inspect.shapes(abstract_params(base, CROP))
  chex.assert_trees_all_close(
    base.apply({'params': folded}, images(), train=False),
    injected.apply({'params': params}, images(), train=False),
    atol=2e-5,
    rtol=2e-5,
  )


def test_bitfit_has_nothing_to_fold():
  injected = finetune.build_model(ft_config('injection', 'bitfit'), 10)
  params = helpers.random_variables(injected, images())['params']
  chex.assert_trees_all_equal(injected.injection.fold(params), params)


# ------------------------------------- task files on one base, end to end


@pytest.fixture(scope='module')
def two_tasks(tmp_path_factory):
  """A base checkpoint at 8 px and two injected runs from it at 12 px."""
  root = tmp_path_factory.mktemp('tasks')
  # Learned position embeddings (ViT-Micro's default is sincos2d), so that
  # fine-tuning at another resolution resizes them.
  base_model = micro(num_classes=1000, posemb='learned')
  base_path = str(root / 'base.npz')
  checkpoint.save(
    base_path, helpers.random_variables(base_model, images())['params']
  )
  runs = {}
  for method in ('ia3', 'lora'):
    config = ft_config('injection', method, pretrained_path=base_path)
    config.model.posemb = 'learned'
    config.pp.crop = 12  # A 3x3 patch grid: position embeddings are resized.
    workdir = str(root / f'digits_{method}')
    runs[method] = (
      config,
      workdir,
      train_lib.train_and_evaluate(config, workdir),
    )
  return base_path, runs


def restored_params(config, workdir):
  target = helpers.create_setup(config, num_classes=10).state
  with train_state.TrainCheckpointer(workdir) as checkpointer:
    return checkpointer.restore(target).params


def test_results_and_task_file_record_what_trained(two_tasks):
  _, runs = two_tasks
  config, workdir, results = runs['ia3']
  with open(os.path.join(workdir, results_lib.RESULTS_FILE)) as f:
    assert json.load(f) == results
  assert results['finetune'] == 'injection (ia3 on key,value,mlp_hidden)'
  assert results['trainable_params'] == (
    LAYERS * (64 + 64 + 128) + 64 * 10 + 10
  )
  assert results['total_params'] > results['trainable_params']
  task_path = os.path.join(workdir, 'task_params.npz')
  assert results['task_file'] == 'task_params.npz'
  assert results['task_file_bytes'] == os.path.getsize(task_path)
  assert results['task_file_sha256'] == paths.sha256(task_path)
  stored = np.load(task_path)
  task_leaves = {k for k in stored.files if not k.startswith('__meta__')}
  assert task_leaves == {
    k
    for k in inspect.flatten(restored_params(config, workdir))
    if k.startswith('head/') or k.endswith('ia3_scale')
  }


def test_tasks_share_one_base_and_reproduce_the_trained_models(
  two_tasks, tmp_path
):
  base_path, runs = two_tasks
  tasks = serving.load_tasks(
    base_path,
    [os.path.join(runs[m][1], 'task_params.npz') for m in ('ia3', 'lora')],
  )
  assert list(tasks) == ['digits_ia3', 'digits_lora']
  ia3, lora = (inspect.flatten(tasks[n].params) for n in tasks)
  shared = [p for p in ia3 if p in lora and ia3[p] is lora[p]]
  assert 'Transformer/posembed_input/pos_embedding' in shared
  chex.assert_shape(
    ia3['Transformer/posembed_input/pos_embedding'], (1, 9, 64)
  )  # GAP: a 3x3 grid, no class token.
  x = images(crop=12)
  for method in ('ia3', 'lora'):
    config, workdir, _ = runs[method]
    task = tasks[f'digits_{method}']
    trained = restored_params(config, workdir)
    chex.assert_trees_all_close(
      task.logits(x),
      task.model.apply({'params': trained}, x, train=False),
      atol=1e-6,
    )
    assert task.class_names == tuple(str(i) for i in range(10))
    exported = str(tmp_path / f'{method}.npz')
    serving.export(task, exported)
    plain = micro(num_classes=10, posemb='learned')
    chex.assert_trees_all_close(
      plain.apply({'params': checkpoint.load(exported)}, x, train=False),
      task.logits(x),
      atol=2e-5,
      rtol=2e-5,
    )


def test_a_task_refuses_another_base(two_tasks, tmp_path):
  base_path, runs = two_tasks
  other = dict(checkpoint.load(base_path))
  other['embedding'] = {k: v + 1 for k, v in other['embedding'].items()}
  other_path = str(tmp_path / 'other.npz')
  checkpoint.save(other_path, other)
  task = os.path.join(runs['ia3'][1], 'task_params.npz')
  with pytest.raises(
    checkpoint.CheckpointError, match='trained on a different base checkpoint'
  ):
    serving.load_tasks(other_path, [task])
  assert serving.load_tasks(other_path, [task], strict=False)


def test_an_injected_run_resumes(two_tasks):
  _, runs = two_tasks
  config, workdir, _ = runs['lora']
  config = config.copy_and_resolve_references()
  config.total_steps = 6
  results = train_lib.train_and_evaluate(config, workdir)
  assert results['resumed_from_step'] == 4
