"""The engines: jit over a mesh (data parallel and FSDP) against pmap."""

import os

import chex
import jax
import numpy as np
import pytest

from tests import helpers
from vit_jax import engine as engine_lib
from vit_jax import steps
from vit_jax import train as train_lib
from vit_jax.benchmarks import timing
from vit_jax.checkpoint import task_file
from vit_jax.checkpoint import train_state
from vit_jax.errors import ConfigError

NUM_CLASSES = 10
# Small enough that the micro model's matrices are sharded under FSDP.
MIN_SIZE = 64


def engine_config(engine='pmap', fsdp=False, **overrides):
  """`helpers.job_config` without dropout (the engines draw their masks
  differently), accumulating over two micro-batches, on `engine`."""
  config = helpers.job_config(
    engine=engine,
    fsdp=fsdp,
    fsdp_min_size=MIN_SIZE,
    accum_steps=2,
    optimizer='sgd',
    base_lr=0.1,
    **overrides,
  )
  config.model.transformer.dropout_rate = 0.0
  config.model.transformer.attention_dropout_rate = 0.0
  return config


def train(config, num_steps=3):
  """The experiment of `config`, its state after `num_steps` steps on fixed
  random batches, and the metrics of the last step."""
  exp = helpers.create_setup(config, NUM_CLASSES)
  engine = exp.engine
  step = engine.train_step(exp.train_step)
  state = engine.place(exp.state)
  devices = jax.local_device_count()
  for seed in range(num_steps):
    batch = timing.host_batch(config.batch, helpers.CROP, NUM_CLASSES, devices)
    batch['image'] += seed
    state, metrics = step(state, engine.put_batch(batch))
  return exp, state, jax.device_get(engine.first(metrics))


@pytest.fixture(scope='module')
def pmap_run():
  return train(engine_config('pmap'))


@pytest.fixture(scope='module')
def fsdp_run():
  return train(engine_config('mesh', fsdp=True))


def test_fsdp_spec_shards_the_largest_divisible_dimension():
  assert engine_lib.fsdp_spec((64, 256), 8, 0) == jax.P(None, 'batch')
  # 12 is the larger dimension but 8 does not divide it.
  assert engine_lib.fsdp_spec((12, 8), 8, 0) == jax.P(None, 'batch')
  assert engine_lib.fsdp_spec((16, 16), 8, 0) == jax.P('batch', None)
  assert engine_lib.fsdp_spec((3, 5), 8, 0) == jax.P()
  assert engine_lib.fsdp_spec((), 8, 0) == jax.P()
  assert engine_lib.fsdp_spec((8, 8), 8, 65) == jax.P()  # Below min_size.


@pytest.mark.parametrize('fsdp', [False, True])
def test_mesh_engine_equals_pmap(pmap_run, fsdp_run, fsdp):
  """Three SGD steps of two accumulated micro-batches on 8 devices: the
  mesh engine, data parallel or FSDP, ends with pmap's params and optimizer
  state up to the order of floating-point sums (rtol 1e-5, atol 1e-6)."""
  exp, pmapped, pmap_metrics = pmap_run
  mesh_exp, state, metrics = fsdp_run if fsdp else train(engine_config('mesh'))
  expected = exp.engine.gather(pmapped)
  chex.assert_trees_all_close(
    mesh_exp.engine.gather(state), expected, rtol=1e-5, atol=1e-6
  )
  chex.assert_trees_all_close(metrics, pmap_metrics, rtol=1e-5, atol=1e-6)
  assert int(state.step) == 3
  moved = jax.tree.map(
    lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
    exp.state.params,
    expected.params,
  )
  assert all(m > 0 for m in jax.tree.leaves(moved))


def test_fsdp_shards_params_and_optimizer_state(fsdp_run):
  """Every leaf of at least `fsdp_min_size` elements is split 8 ways on
  the devices, params and SGD momentum alike; smaller leaves are whole."""
  _, state, _ = fsdp_run
  sharded = 0
  for leaf in jax.tree.leaves((state.params, state.opt_state)):
    shard = leaf.addressable_shards[0].data
    if leaf.size >= MIN_SIZE and any(d % 8 == 0 for d in leaf.shape):
      assert shard.size * 8 == leaf.size, leaf.shape
      sharded += 1
    else:
      assert shard.shape == leaf.shape
  assert sharded >= 8


def test_the_mesh_engine_evaluates_as_pmap(pmap_run, fsdp_run):
  """The eval step on the mesh (FSDP params, one global batch) sums what
  pmap's devices sum."""
  exp, pmapped, _ = pmap_run
  params = exp.engine.gather(pmapped).params
  batch = timing.host_batch(64, helpers.CROP, NUM_CLASSES, 8)
  batch['mask'] = np.arange(64).reshape(8, 8) % 3 > 0
  sums = {}
  for name, (run, _, _) in (('pmap', pmap_run), ('fsdp', fsdp_run)):
    engine = run.engine
    step = engine.eval_step(run.eval_step)
    placed = engine.place(params)
    sums[name] = jax.device_get(
      engine.first(step(placed, engine.put_batch(batch)))
    )
  chex.assert_trees_all_close(sums['fsdp'], sums['pmap'], rtol=1e-5)
  assert sums['fsdp']['count'] == np.sum(batch['mask'])


def test_checkpoints_restore_across_engines_and_device_counts(
  fsdp_run, tmp_path
):
  """A state saved FSDP-sharded over 8 devices restores bit-equal into
  pmap on 1 device and into FSDP on 2, and back."""
  exp, state, _ = fsdp_run
  saved = exp.engine.gather(state)
  layouts = {
    'pmap_1': engine_lib.PmapEngine(jax.local_devices()[:1]),
    'fsdp_2': engine_lib.MeshEngine(jax.local_devices()[:2], True, MIN_SIZE),
    'fsdp_8': exp.engine,
  }
  with train_state.TrainCheckpointer(tmp_path, asynchronous=False) as ckpt:
    ckpt.save(3, exp.engine.saveable(state))
    for name, engine in layouts.items():
      restored = ckpt.restore(engine.restore_target(exp.state))
      chex.assert_trees_all_equal(
        jax.device_get(restored), jax.device_get(saved), custom_message=name
      )
      placed = engine.place(restored)
      ckpt.save(int(restored.step) + 1, engine.saveable(placed))
    # What the last layout saved reads back into the first.
    again = ckpt.restore(layouts['pmap_1'].restore_target(exp.state))
  chex.assert_trees_all_equal(jax.device_get(again), jax.device_get(saved))


def test_engine_config_errors():
  with pytest.raises(ConfigError, match='config.engine=.jit.'):
    engine_lib.from_config(helpers.job_config(engine='jit'))
  with pytest.raises(ConfigError, match='config.engine=mesh'):
    engine_lib.from_config(helpers.job_config(fsdp=True))
  assert steps.AXIS == engine_lib.PmapEngine.axis_name


@pytest.mark.slow
def test_a_run_moves_between_engines(tmp_path):
  """Two steps with FSDP on the mesh, then two more resumed under pmap,
  end where four pmap steps end: the checkpoint, evaluation, few-shot
  and the task file all work under FSDP, and the layout is no part of
  the state."""
  config = engine_config(
    'mesh', fsdp=True, total_steps=2, eval_every=2, checkpoint_every=2
  )
  config.fewshot.shots = (2,)
  workdir = str(tmp_path / 'moved')
  first = train_lib.train_and_evaluate(config, workdir)
  assert first['fewshot_accuracy']['2shot'] >= 0
  assert os.path.exists(os.path.join(workdir, first['task_file']))
  config.update(engine='pmap', fsdp=False, total_steps=4)
  moved = train_lib.train_and_evaluate(config, workdir)
  assert moved['resumed_from_step'] == 2
  config.update(eval_every=4, checkpoint_every=4)
  straight_dir = str(tmp_path / 'straight')
  straight = train_lib.train_and_evaluate(config, straight_dir)
  np.testing.assert_allclose(
    moved['test_loss'], straight['test_loss'], rtol=1e-5
  )
  chex.assert_trees_all_close(
    trained_arrays(os.path.join(workdir, moved['task_file'])),
    trained_arrays(os.path.join(straight_dir, straight['task_file'])),
    rtol=1e-4,
    atol=1e-6,
  )


def trained_arrays(path):
  """The trained leaves in a task file, without its description."""
  with np.load(path) as arrays:
    return {k: arrays[k] for k in arrays.files if k != task_file.META_KEY}


def test_the_mesh_steps_export_for_tpu_and_cuda():
  """The train and eval steps of the mesh engine, with FSDP, remat, scanned
  blocks and bfloat16 compute, lower for TPU and CUDA on this CPU-only
  machine (`jax.export`, no device needed): the program keeps the FSDP
  shardings of the state (Shardy annotations on the mesh axis)."""
  config = engine_config('mesh', fsdp=True, dtype='bfloat16')
  config.model.transformer.update(remat=True, scan=True)
  exp = helpers.create_setup(config, NUM_CLASSES)
  engine = exp.engine
  state = engine.restore_target(exp.state)
  shapes = {
    'image': jax.ShapeDtypeStruct(
      (32, helpers.CROP, helpers.CROP, 3), 'float32'
    ),
    'label': jax.ShapeDtypeStruct((32,), 'int32'),
  }
  batch = engine.abstract_batch(shapes)
  platforms = ('tpu', 'cuda')
  train = jax.export.export(
    engine.train_step(exp.train_step), platforms=platforms
  )(state, batch)
  assert train.platforms == platforms
  assert train.nr_devices == 8
  module = train.mlir_module()
  assert '#sdy.sharding<@mesh, [{"batch"}' in module  # The batch.
  assert '[{}, {"batch"}]' in module  # A matrix sharded on its columns.
  batch = engine.abstract_batch(
    dict(shapes, mask=jax.ShapeDtypeStruct((32,), 'bool'))
  )
  evaluate = jax.export.export(
    engine.eval_step(exp.eval_step), platforms=platforms
  )(state.params, batch)
  assert evaluate.platforms == platforms
