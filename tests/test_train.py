"""Training: schedules, data parallelism, accumulation, resume, main."""

import json
import os
import pathlib
import shlex
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from tests import helpers
from vit_jax import checkpoint
from vit_jax import errors
from vit_jax import inference_time
from vit_jax import input_pipeline
from vit_jax import lifecycle
from vit_jax import losses
from vit_jax import metrics as metrics_lib
from vit_jax import models
from vit_jax import optim
from vit_jax import steps as step_lib
from vit_jax import train as train_lib
from vit_jax import trainable as trainable_lib
from vit_jax.checkpoint import task_file
from vit_jax.checkpoint import train_state
from vit_jax.errors import ConfigError
from vit_jax.models import table

CROP = helpers.CROP
REPO = pathlib.Path(__file__).resolve().parent.parent


def schedule(
  decay_type: str, warmup: int = 10, total: int = 110, base_lr: float = 0.5
):
  return optim.learning_rate_schedule(
    base_lr=base_lr,
    total_steps=total,
    warmup_steps=warmup,
    decay_type=decay_type,
  )


@pytest.mark.parametrize(
  'decay_type,expected',
  [
    # step: 0, 5 (mid warm-up), 10 (peak), 60 (half-way), 110 (end)
    ('cosine', [0.0, 0.25, 0.5, 0.25, 0.0]),
    ('linear', [0.0, 0.25, 0.5, 0.25 + 0.5e-5, 1e-5]),  # Ends at 1e-5.
    ('constant', [0.0, 0.25, 0.5, 0.5, 0.5]),
  ],
)
def test_schedule_values(decay_type, expected):
  values = [float(schedule(decay_type)(step)) for step in (0, 5, 10, 60, 110)]
  np.testing.assert_allclose(values, expected, atol=1e-7)


@pytest.mark.parametrize('decay_type', optim.DECAY_TYPES)
def test_a_run_shorter_than_its_warm_up_warms_up_throughout(decay_type):
  short = schedule(decay_type, warmup=200, total=110)
  np.testing.assert_allclose(
    [float(short(step)) for step in (0, 50, 110)], [0.0, 0.125, 0.275]
  )


def test_cosine_matches_vit_jax_formula():
  cosine = schedule('cosine')
  for step in (13, 37, 81):
    progress = (step - 10) / 100
    expected = 0.5 * 0.5 * (1 + np.cos(np.pi * progress))
    np.testing.assert_allclose(float(cosine(step)), expected, rtol=1e-6)


def test_linear_matches_vit_jax_formula():
  """vit_jax: linear_end + (base - linear_end) * (1 - progress), with
  linear_end=1e-5, times the warm-up ramp min(1, step / warmup)."""
  linear = schedule('linear')
  for step in (4, 13, 37, 81, 110, 150):
    progress = np.clip((step - 10) / 100, 0.0, 1.0)
    expected = (1e-5 + (0.5 - 1e-5) * (1 - progress)) * min(1.0, step / 10)
    np.testing.assert_allclose(float(linear(step)), expected, rtol=1e-5)


def test_schedule_rejects_bad_settings():
  with pytest.raises(ConfigError, match='decay_type'):
    schedule('step')
  with pytest.raises(ConfigError, match='warmup_steps=-1'):
    schedule('cosine', warmup=-1)
  with pytest.raises(ConfigError, match="optimizer='lamb'"):
    optim.make_optimizer(
      'lamb',
      schedule('cosine'),
      weight_decay=0.0,
      grad_norm_clip=None,
      moment_dtype='float32',
    )


# ------------------------------------------------------- one update step


def everything(path: str) -> bool:
  del path
  return True


def tiny_setup(
  optimizer_name: str = 'sgd',
  accum_steps: int = 1,
  trainable=everything,
  ema_decay: float = 0.0,
):
  """Two-layer ViT-Micro_4 at 8x8 (4 tokens), its params and a train step."""
  lr = schedule('cosine', warmup=2, total=10, base_lr=0.1)
  model = models.build_model(helpers.micro_model_config(), num_classes=10)
  params = model.init(
    jax.random.key(0), jnp.zeros([1, CROP, CROP, 3]), train=False
  )['params']
  # A non-zero head, so that every parameter gets a gradient.
  params['head']['kernel'] = 0.1 * jax.random.normal(
    jax.random.key(1), params['head']['kernel'].shape
  )
  optimizer = optim.make_optimizer(
    optimizer_name,
    lr,
    weight_decay=0.01,
    grad_norm_clip=1.0,
    moment_dtype='float32',
  )
  state = step_lib.initial_state(params, optimizer, trainable, ema_decay)
  train_step = step_lib.make_train_step(
    losses.classifier_loss(model),
    optimizer,
    lr,
    trainable,
    accum_steps=accum_steps,
    ema_decay=ema_decay,
  )
  return state, train_step


def random_batches(count: int, batch: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  return [
    {
      'image': rng.uniform(-1, 1, [batch, CROP, CROP, 3]).astype(np.float32),
      'label': rng.integers(0, 10, [batch]).astype(np.int32),
    }
    for _ in range(count)
  ]


def run_steps(state, train_step, batches, devices):
  """Runs the steps data-parallel over `devices`; returns the final state."""
  mapped = step_lib.data_parallel(train_step, devices=devices)
  replicated = step_lib.replicate(state, devices)
  for batch in batches:
    split = jax.tree.map(
      lambda x: x.reshape(len(devices), -1, *x.shape[1:]), batch
    )
    replicated, metrics = mapped(replicated, split)
    assert np.isfinite(metrics['loss']).all()
  return step_lib.unreplicate(replicated)


def test_eight_devices_equal_one():
  """Same global batches on 1 and 8 devices: the same params after 3 steps.

  Only the order of floating-point sums differs (pmean over devices vs one
  device's mean), so params agree to 1e-5 relative / 1e-6 absolute. (SGD:
  Adam divides by sqrt(v) and so amplifies that noise wherever a gradient is
  near zero, e.g. the attention key biases, whose true gradient is 0.)
  """
  assert jax.local_device_count() == 8
  state, train_step = tiny_setup('sgd')
  batches = random_batches(3, 16)
  one = run_steps(state, train_step, batches, jax.local_devices()[:1])
  eight = run_steps(state, train_step, batches, jax.local_devices())
  chex.assert_trees_all_close(one.params, eight.params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(
    one.opt_state, eight.opt_state, rtol=1e-5, atol=1e-6
  )
  assert int(one.step) == int(eight.step) == 3
  moved = jax.tree.map(
    lambda a, b: float(jnp.abs(a - b).max()), state.params, one.params
  )
  assert all(m > 0 for m in jax.tree.leaves(moved))  # Every param updated.


def test_replicated_state_has_the_step_outputs_sharding():
  """`replicate` lays the state out as the step returns it, so the second
  call reuses the first call's compiled step (one compilation per run)."""
  state, train_step = tiny_setup('sgd')
  devices = jax.local_devices()
  mapped = step_lib.data_parallel(train_step, devices=devices)
  replicated = step_lib.replicate(state, devices)
  batch = step_lib.shard(
    jax.tree.map(
      lambda x: x.reshape(len(devices), -1, *x.shape[1:]),
      random_batches(1, 16)[0],
    ),
    devices,
  )
  returned, _ = mapped(replicated, batch)
  for before, after in zip(
    jax.tree.leaves(replicated), jax.tree.leaves(returned)
  ):
    assert before.sharding == after.sharding
  chex.assert_trees_all_equal(step_lib.unreplicate(replicated), state)


def test_replicated_copies_do_not_share_memory():
  """Each device's copy of a replicated jax.Array (a restored or freshly
  built state) is its own buffer, so donating them to the step is safe."""
  replicated = step_lib.replicate({'w': jnp.arange(12.0).reshape(3, 4)})
  pointers = {
    s.data.unsafe_buffer_pointer() for s in replicated['w'].addressable_shards
  }
  assert len(pointers) == jax.local_device_count() == 8


def test_accumulated_gradients_equal_one_big_batch():
  state, plain_step = tiny_setup(accum_steps=1)
  _, accum_step = tiny_setup(accum_steps=4)
  batches = random_batches(2, 16)
  device = jax.local_devices()[:1]
  plain = run_steps(state, plain_step, batches, device)
  accumulated = run_steps(state, accum_step, batches, device)
  chex.assert_trees_all_close(
    plain.params, accumulated.params, rtol=1e-5, atol=1e-6
  )


def test_moving_average_weighs_each_steps_params_by_decay_powers():
  """After n steps, `ema_params` is sum_i d^(n-i) p_i / sum_i d^(n-i) over
  the trained leaves' values p_1..p_n after each step (the initial values
  have weight 0); frozen leaves have no average and are evaluated as they
  are. The average does not change what trains."""
  decay = 0.6
  state, plain_step = tiny_setup('adamw', trainable=trainable_lib.is_head)
  ema_state, ema_step = tiny_setup(
    'adamw', trainable=trainable_lib.is_head, ema_decay=decay
  )
  device = jax.local_devices()[:1]
  trajectory = []
  for batch in random_batches(4, 16):
    state = run_steps(state, plain_step, [batch], device)
    ema_state = run_steps(ema_state, ema_step, [batch], device)
    trajectory.append(state.params['head'])
  chex.assert_trees_all_close(ema_state.params, state.params)
  weights = decay ** np.arange(len(trajectory))[::-1]
  expected = jax.tree.map(
    lambda *ps: sum(w * p for w, p in zip(weights, ps)) / weights.sum(),
    *trajectory,
  )
  assert set(ema_state.ema_params) == {'head'}
  chex.assert_trees_all_close(
    ema_state.ema_params['head'], expected, rtol=1e-5, atol=1e-7
  )
  evaluated = step_lib.evaluated_params(ema_state)
  chex.assert_trees_all_close(evaluated['head'], expected, rtol=1e-5)
  chex.assert_trees_all_equal(
    evaluated['Transformer'], state.params['Transformer']
  )
  assert not np.allclose(expected['kernel'], state.params['head']['kernel'])


def test_moving_average_settings_are_checked():
  with pytest.raises(ConfigError, match=r'config.ema_decay=1.0 must be in'):
    tiny_setup(ema_decay=1.0)
  state, _ = tiny_setup(ema_decay=0.0)
  _, ema_step = tiny_setup(ema_decay=0.9)
  with pytest.raises(ValueError, match='state without moving averages'):
    run_steps(state, ema_step, random_batches(1, 16), jax.local_devices()[:1])


def test_bf16_momentum_state():
  params = {'w': jnp.ones([3, 3])}
  defaults = common.get_config()  # vit_jax's SGD with momentum.
  optimizer = optim.make_optimizer(
    defaults.optimizer,
    lambda step: 0.1,
    weight_decay=0.0,
    grad_norm_clip=None,
    moment_dtype=defaults.optim_dtype,
  )
  dtypes = {
    leaf.dtype for leaf in jax.tree.leaves(optimizer.init(params)) if leaf.ndim
  }
  assert dtypes == {jnp.dtype(jnp.bfloat16)}  # optim_dtype's default.


def eval_setup():
  """A micro ViT, its params, and a batch of 16 whose first 11 are real,
  also split over the 8 devices."""
  model = models.build_model(helpers.micro_model_config(), num_classes=10)
  params = model.init(
    jax.random.key(0), jnp.zeros([1, CROP, CROP, 3]), train=False
  )['params']
  batch = random_batches(1, 16)[0]
  batch['mask'] = np.arange(16) < 11
  split = jax.tree.map(lambda x: x.reshape(8, 2, *x.shape[1:]), batch)
  return model, params, batch, split


def test_eval_step_counts_only_masked_in_examples():
  model, params, batch, split = eval_setup()
  eval_step = step_lib.data_parallel(step_lib.make_eval_step(model))
  sums = eval_step(step_lib.replicate(params), split)
  logits = model.apply({'params': params}, batch['image'], train=False)
  correct = (np.argmax(logits, -1) == batch['label'])[:11].sum()
  np.testing.assert_array_equal(sums['count'], np.full(8, 11.0))
  np.testing.assert_array_equal(sums['correct'], np.full(8, correct))


def test_eval_step_over_shifted_views_scores_their_mean_softmax():
  """Over 8 devices, with 11 of 16 examples real: the views' sums are
  those of the mean softmax over the 9 shifted images, computed here one
  view at a time; the one-view sums are the plain eval step's."""
  model, params, batch, split = eval_setup()
  replicated = step_lib.replicate(params)
  plain = step_lib.data_parallel(step_lib.make_eval_step(model))
  shifted = step_lib.data_parallel(step_lib.make_eval_step(model, 1))
  sums, plain_sums = shifted(replicated, split), plain(replicated, split)

  probs = np.mean(
    [
      jax.nn.softmax(
        model.apply(
          {'params': params},
          helpers.numpy_shift(batch['image'], r, c),
          train=False,
        )
      )
      for r in (-1, 0, 1)
      for c in (-1, 0, 1)
    ],
    axis=0,
  )[:11]
  labels = batch['label'][:11]
  correct = (probs.argmax(-1) == labels).sum()
  loss = -np.log(probs[np.arange(11), labels]).sum()
  np.testing.assert_array_equal(sums['count'], np.full(8, 11.0))
  np.testing.assert_array_equal(sums['correct'], np.full(8, correct))
  chex.assert_trees_all_close(sums['loss'], np.full(8, loss), rtol=1e-5)
  chex.assert_trees_all_close(
    (sums['one_view_correct'], sums['one_view_loss']),
    (plain_sums['correct'], plain_sums['loss']),
    rtol=1e-6,
  )


# ------------------------------------------------------- the whole job


def final_state(config, workdir):
  """The latest checkpoint of `workdir`, restored into `config`'s state."""
  target = helpers.create_setup(config, num_classes=10).state
  with train_state.TrainCheckpointer(workdir) as checkpointer:
    return checkpointer.latest_step(), checkpointer.restore(target)


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(tmp_path, monkeypatch):
  """With a moving average of the weights, which the checkpoint holds and
  the task file and the reported accuracy use. (Without one, the SIGTERM
  test of test_lifecycle.py checks the same equality.)"""
  config = helpers.job_config(ema_decay=0.8)
  train_lib.train_and_evaluate(config, str(tmp_path / 'straight'))

  crash_dir = str(tmp_path / 'crashed')
  original_write = metrics_lib.MetricWriter.write

  def crash_at_step_4(self, step, scalars):
    if step == 4:
      raise KeyboardInterrupt('simulated crash at step 4')
    original_write(self, step, scalars)

  monkeypatch.setattr(metrics_lib.MetricWriter, 'write', crash_at_step_4)
  # Ctrl-C saves the step it stopped at (3 was saved on its interval).
  with pytest.raises(
    errors.Interrupted, match='saved a checkpoint of step 4 in'
  ):
    train_lib.train_and_evaluate(config, crash_dir)
  monkeypatch.undo()
  with train_state.TrainCheckpointer(crash_dir) as checkpointer:
    assert checkpointer.all_steps() == [3, 4]
  results = train_lib.train_and_evaluate(config, crash_dir)
  assert results['resumed_from_step'] == 4

  (step_a, straight), (step_b, resumed) = (
    final_state(config, str(tmp_path / 'straight')),
    final_state(config, crash_dir),
  )
  assert step_a == step_b == 6
  chex.assert_trees_all_equal(straight, resumed)
  evaluated = step_lib.evaluated_params(resumed)
  saved = task_file.load_task_params(
    os.path.join(crash_dir, config.finetune.task_file), resumed.params
  )
  chex.assert_trees_all_equal(saved, evaluated)
  hosts = input_pipeline.Hosts.from_jax()
  source = input_pipeline.get_source(config.dataset)
  test = helpers.evaluate(
    helpers.create_setup(config, num_classes=10),
    evaluated,
    input_pipeline.eval_dataset(source, config.pp, batch_size=256, hosts=hosts),
  )
  assert test['accuracy'] == results['test_accuracy']
  assert set(resumed.ema_params) == set(resumed.params)
  assert not np.allclose(
    evaluated['head']['kernel'], resumed.params['head']['kernel']
  )


def test_batch_that_does_not_divide_is_a_config_error(tmp_path):
  with pytest.raises(ConfigError, match=r'config.batch=30 .* 8 devices'):
    train_lib.train_and_evaluate(helpers.job_config(batch=30), str(tmp_path))
  with pytest.raises(ConfigError, match=r'accum_steps=3 does not divide'):
    train_lib.train_and_evaluate(
      helpers.job_config(batch=32, accum_steps=3), str(tmp_path)
    )
  assert not os.path.exists(tmp_path / 'checkpoints')  # Nothing started.


@pytest.mark.slow
def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
  config = helpers.job_config(
    base_lr=1e30,
    warmup_steps=0,
    grad_norm_clip=None,
    optimizer='sgd',
    checkpoint_every=1,
    total_steps=20,
  )
  with pytest.raises(
    FloatingPointError, match=r'loss is .* at step \d+ .*stopped'
  ) as error:
    train_lib.train_and_evaluate(config, str(tmp_path))
  bad_step = int(error.value.args[0].split('at step ')[1].split(' ')[0])
  step, state = final_state(config, str(tmp_path))
  assert step == bad_step - 1
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state))


@pytest.mark.parametrize(
  'last_checkpoint,dtype', [(None, 'float32'), (4, 'bfloat16')]
)
def test_divergence_message(last_checkpoint, dtype):
  """Says whether a finite checkpoint exists; suggests float32 only when
  the run computes in another dtype."""
  message = str(
    lifecycle.divergence_error(
      7,
      {'loss': float('nan'), 'params_finite': 0.0},
      last_checkpoint,
      'RUN/checkpoints',
      dtype,
    )
  )
  assert 'at step 7' in message and 'None' not in message
  if last_checkpoint is None:
    assert 'No checkpoint was saved yet' in message
  else:
    assert 'finite values is step 4 in RUN/checkpoints' in message
  assert ("dtype='float32'" in message) == (dtype != 'float32')


@pytest.mark.slow
def test_main_end_to_end_on_mnist5k(tmp_path):
  """`python -m vit_jax.main` trains, evaluates and writes its files."""
  workdir = tmp_path / 'run'
  command = [
    sys.executable,
    '-m',
    'vit_jax.main',
    f'--config={REPO}/configs/scratch.py:mnist5k,micro4',
    '--config.model.transformer.num_layers=2',
    f'--workdir={workdir}',
    '--config.total_steps=30',
    '--config.pp.crop=16',
    '--config.batch=64',
    '--config.eval_every=15',
    '--config.progress_every=5',
    '--config.checkpoint_every=15',
    '--config.warmup_steps=3',
    '--config.base_lr=0.003',
    '--config.pp.augment=pad_and_crop',  # Learns faster than affine.
    '--config.fewshot.shots=(1,5)',
    '--config.eval_shift=1',
  ]
  # Two devices (not the session's 8): pmap over several, at less cost.
  env = helpers.cpu_env(2)
  process = subprocess.run(
    command,
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert process.returncode == 0, process.stderr[-3000:]
  assert 'step 30/30 (100.0%)' in process.stderr and 'ETA' in process.stderr
  assert 'Compiling the train step' in process.stderr
  assert process.stdout.startswith('test accuracy 0.') and (
    'on 1,000 images (mean of 9 views shifted by up to 1 px; one view: 0.'
    in process.stdout
    and f'results in {workdir}/results.json' in process.stdout
  )

  results = json.loads((workdir / 'results.json').read_text())
  assert results['test_examples'] == 1000  # Every test image, once.
  assert results['steps'] == 30 and results['devices'] == 2
  assert results['trainable_params'] == results['total_params'] > 0
  assert results['config']['dataset'] == 'mnist5k'
  assert 0.0 <= results['test_accuracy'] <= 1.0
  assert results['eval_views'] == 9
  assert 0.0 <= results['test_one_view_accuracy'] <= 1.0
  assert results['command'] == shlex.join(
    ['python', '-m', 'vit_jax.main'] + command[3:]
  )  # For model cards.

  lines = [
    json.loads(line)
    for line in (workdir / 'metrics.jsonl').read_text().splitlines()
  ]
  losses = [line['train/loss'] for line in lines if 'train/loss' in line]
  assert len(losses) == 6 and losses[-1] < losses[0] - 0.1  # Loss falls.
  assert [line['step'] for line in lines if 'test/accuracy' in line] == [15, 30]
  assert [
    line['step'] for line in lines if 'test/one_view_accuracy' in line
  ] == [15, 30]
  last_test = [line for line in lines if 'test/accuracy' in line][-1]
  assert (last_test['test/accuracy'], last_test['test/one_view_accuracy']) == (
    results['test_accuracy'],
    results['test_one_view_accuracy'],
  )
  fewshot = [line for line in lines if 'fewshot/5shot' in line]
  assert [line['step'] for line in fewshot] == [15, 30]
  assert results['fewshot_accuracy'] == {
    k: fewshot[-1][f'fewshot/{k}'] for k in ('1shot', '5shot')
  }
  assert all(0.0 <= v <= 1.0 for v in results['fewshot_accuracy'].values())
  assert 'few-shot linear accuracy 1-shot 0.' in process.stderr
  assert all(
    line['img_per_sec_per_core'] > 0 for line in lines if 'train/loss' in line
  )
  assert list(workdir.glob('events.out.tfevents.*'))
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == [
    '15',
    '30',
  ]


def test_inference_time_job(tmp_path):
  config = helpers.job_config(batch_eval=16, trainer='inference_time')
  results = inference_time.inference_time(config, str(tmp_path))
  written = json.loads((tmp_path / 'inference_time.json').read_text())
  assert written == results
  assert results['devices'] == 8 and results['batch'] == 16
  assert results['img_per_sec'] > 0 and results['median_batch_seconds'] > 0
  # The model of config.model at config.pp.crop, with 1,000 classes.
  model = models.build_model(config.model, num_classes=1000)
  np.testing.assert_allclose(
    results['gflops_per_image'] * 1e9,
    table.forward_flops(
      model, table.abstract_variables(model, helpers.CROP), helpers.CROP
    ),
    rtol=1e-2,
  )


def test_pretrained_checkpoint_initialises_all_but_the_head(tmp_path):
  """`config.pretrained_path`: encoder from the file, head reset to zero."""
  source_config = helpers.job_config()
  pretrained = helpers.create_setup(source_config, num_classes=1000)
  path = str(tmp_path / 'ViT-Micro_4.npz')
  checkpoint.save(path, pretrained.state.params)

  for overrides in [
    {'pretrained_path': path},
    {'pretrained_dir': str(tmp_path)},
  ]:
    setup = helpers.create_setup(
      helpers.job_config(seed=7, **overrides), num_classes=10
    )
    params = dict(setup.state.params)
    head = params.pop('head')
    expected = dict(pretrained.state.params)
    expected.pop('head')
    chex.assert_trees_all_close(params, expected)
    chex.assert_trees_all_equal(head, jax.tree.map(jnp.zeros_like, head))
    chex.assert_shape(head['kernel'], (64, 10))


def test_bfloat16_compute_keeps_float32_params():
  config = helpers.job_config(dtype='bfloat16')
  setup = helpers.create_setup(config, num_classes=10)
  train_step = step_lib.make_train_step(
    losses.classifier_loss(setup.model),
    setup.optimizer,
    setup.schedule,
    setup.trainable,
  )
  batch = random_batches(1, 4)[0]
  state = run_steps(setup.state, train_step, [batch], jax.local_devices()[:1])
  assert {p.dtype for p in jax.tree.leaves(state.params)} == {
    jnp.dtype(jnp.float32)
  }
  logits = setup.model.apply(
    {'params': state.params}, batch['image'], train=False
  )
  assert logits.dtype == jnp.float32
