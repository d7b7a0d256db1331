"""Multi-host training, executed: 2 processes x 4 CPU devices on localhost.

The module's fixture starts two processes of `tests/multihost_worker.py`,
joined by `jax.distributed` (gloo collectives on CPU) through the
environment variables of `--config.distributed=True`; they train the real
job for 2 steps in one shared workdir, then again to 4 steps, so both
resume from the checkpoint. The tests compare what they did with a
1-process, 8-device run of the same global batches in this process.

Another case (another engine or config) needs no other worker: a module
fixture of its own that calls `run_processes(workdir, steps, out_dir,
overrides)` in a fresh workdir, and a reference trained here from
`multihost_worker.job_config(steps, **overrides)`.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from tests import helpers
from tests import multihost_worker
from vit_jax import input_pipeline
from vit_jax import main as main_lib
from vit_jax import metrics
from vit_jax import results as results_lib
from vit_jax import workdir_lock
from vit_jax.checkpoint import train_state
from vit_jax.input_pipeline import splits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESSES, LOCAL_DEVICES = 2, 4
FIRST_STEPS, TOTAL_STEPS = 2, 4
TIMEOUT_S = 120  # Per 2-process run; each takes ~15 s on 2 cores.


def _stop(processes) -> None:
  for process in processes:
    if process.poll() is None:
      os.killpg(process.pid, signal.SIGKILL)
      process.wait()


def run_processes(
  workdir: str, total_steps: int, out_dir: str, overrides=None
) -> list:
  """Trains `total_steps` on 2 processes, with the config overrides of
  `multihost_worker.job_config`; their records, by process index.

  Both processes are killed as soon as one fails or the time is up (a
  process whose peer died would wait for it for minutes).
  """
  port = helpers.free_port()
  processes, logs = [], []
  for index in range(PROCESSES):
    env = helpers.process_env(LOCAL_DEVICES)
    env.update(
      {
        main_lib.COORDINATOR_ADDRESS_ENV: f'127.0.0.1:{port}',
        main_lib.NUM_PROCESSES_ENV: str(PROCESSES),
        main_lib.PROCESS_ID_ENV: str(index),
      }
    )
    logs.append(os.path.join(out_dir, f'process{index}.log'))
    record = os.path.join(out_dir, f'process{index}.json')
    with open(logs[-1], 'w') as log:
      processes.append(
        subprocess.Popen(
          [
            sys.executable,
            '-m',
            'tests.multihost_worker',
            workdir,
            str(total_steps),
            record,
            json.dumps(overrides or {}),
          ],
          cwd=REPO,
          env=env,
          stdout=log,
          stderr=subprocess.STDOUT,
          start_new_session=True,  # Its own group: killed with its threads.
        )
      )
  deadline = time.monotonic() + TIMEOUT_S
  try:
    while any(p.poll() is None for p in processes):
      failed = any(p.poll() not in (None, 0) for p in processes)
      if failed or time.monotonic() > deadline:
        break
      time.sleep(0.2)
  finally:
    _stop(processes)
  codes = [p.returncode for p in processes]
  if codes != [0] * PROCESSES:
    tails = '\n'.join(
      f'--- process {i} (exit {code}):\n' + open(log).read()[-3000:]
      for i, (code, log) in enumerate(zip(codes, logs))
    )
    pytest.fail(f'2-process training failed or timed out:\n{tails}')
  records = []
  for index in range(PROCESSES):
    with open(os.path.join(out_dir, f'process{index}.json')) as f:
      records.append(json.load(f))
  return records


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """The shared workdir and the records of the 2-step and 4-step runs."""
  root = tmp_path_factory.mktemp('multihost')
  workdir = str(root / 'workdir')
  os.makedirs(workdir)
  records = {}
  for steps_ in (FIRST_STEPS, TOTAL_STEPS):
    out_dir = root / f'run{steps_}'
    out_dir.mkdir()
    records[steps_] = run_processes(workdir, steps_, str(out_dir))
  return workdir, records


@pytest.fixture(scope='module')
def mesh_run(tmp_path_factory):
  """The workdir of a 4-step run of the 2 processes on the mesh engine
  with FSDP (each process holds its shards of the state)."""
  root = tmp_path_factory.mktemp('multihost_mesh')
  workdir = str(root / 'workdir')
  os.makedirs(workdir)
  run_processes(workdir, TOTAL_STEPS, str(root), multihost_worker.MESH)
  return workdir


@pytest.fixture(scope='module')
def source():
  return input_pipeline.get_source(multihost_worker.job_config(1).dataset)


def host_batches(config, source, hosts):
  return input_pipeline.train_dataset(
    source,
    config.pp,
    batch_size=config.batch,
    seed=config.seed,
    shuffle_buffer=config.shuffle_buffer,
    hosts=hosts,
  ).as_numpy_iterator()


def train_reference(source, overrides=None):
  """`TOTAL_STEPS` steps of `multihost_worker.job_config` with `overrides`
  on this process's 8 devices, host h's batches on devices 4h..4h+3: the
  global batches of the 2 processes, in their order. The setup and the
  final state."""
  config = multihost_worker.job_config(TOTAL_STEPS, **(overrides or {}))
  setup = helpers.create_setup(config, source.info.num_classes)
  engine = setup.engine
  train_step = engine.train_step(setup.train_step)
  assert jax.local_device_count() == PROCESSES * LOCAL_DEVICES
  streams = [
    host_batches(config, source, input_pipeline.Hosts(h, 2, LOCAL_DEVICES))
    for h in range(PROCESSES)
  ]
  state = engine.place(setup.state)
  for _ in range(TOTAL_STEPS):
    host = [next(stream) for stream in streams]
    batch = {k: np.concatenate([b[k] for b in host]) for k in host[0]}
    state, _ = train_step(state, engine.put_batch(batch))
  return setup, engine.gather(state)


@pytest.fixture(scope='module')
def reference(source):
  return train_reference(source)


def restored(workdir, setup):
  with train_state.TrainCheckpointer(workdir) as checkpointer:
    return checkpointer.all_steps(), checkpointer.restore(setup.state)


@pytest.mark.slow
def test_params_equal_one_process_with_eight_devices(runs, reference):
  """The multi-host checkpoint of step 4 holds the reference's state.

  The processes average gradients across hosts (gloo) where the reference
  averages them within one process: only the order of floating-point sums
  may differ, so the params agree to 1e-5 relative / 1e-6 absolute (SGD,
  whose update does not magnify that noise).
  """
  workdir, _ = runs
  setup, expected = reference
  saved_steps, state = restored(workdir, setup)
  assert saved_steps == [FIRST_STEPS, TOTAL_STEPS]
  assert int(state.step) == TOTAL_STEPS
  chex.assert_trees_all_close(
    state.params, expected.params, rtol=1e-5, atol=1e-6
  )
  chex.assert_trees_all_close(
    state.opt_state, expected.opt_state, rtol=1e-5, atol=1e-6
  )
  moved = jax.tree.map(
    lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
    setup.state.params,
    state.params,
  )
  assert min(jax.tree.leaves(moved)) > 0  # Every param trained.


@pytest.mark.slow
def test_fsdp_on_two_processes_equals_one_process(mesh_run, source):
  """The mesh engine with FSDP over 2 processes x 4 devices saves, at step
  4, the state one process with a mesh of 8 devices reaches on the same
  global batches (dropout included: the mesh draws one mask for the global
  batch, whatever its layout), to 1e-5 as above."""
  setup, expected = train_reference(source, multihost_worker.MESH)
  _, state = restored(mesh_run, setup)
  assert int(state.step) == TOTAL_STEPS
  chex.assert_trees_all_close(state, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_each_process_read_a_disjoint_shard(runs, source):
  """Process i built its pipelines for host i of 2, whose shards of the
  training and test splits are disjoint and together the whole split."""
  _, records = runs
  config = multihost_worker.job_config(TOTAL_STEPS)
  for run in records.values():
    for index, record in enumerate(run):
      assert record['process_index'] == index
      assert record['process_count'] == PROCESSES
      assert record['local_devices'] == LOCAL_DEVICES
      assert record['devices'] == PROCESSES * LOCAL_DEVICES
      for kind in ('train', 'eval'):
        (call,) = record['pipelines'][kind]
        assert call['process_index'] == index
        assert call['process_count'] == PROCESSES
        assert call['local_devices'] == LOCAL_DEVICES
  for split in (config.pp.train, config.pp.test):
    indices = splits.split_indices(
      split, source.info.split_sizes, source.info.name
    )
    shards = [
      set(splits.host_shard(indices, r['process_index'], r['process_count']))
      for r in records[TOTAL_STEPS]
    ]
    assert not shards[0] & shards[1], split
    assert shards[0] | shards[1] == set(indices), split
    assert min(map(len, shards)) > 0


@pytest.mark.slow
def test_evaluation_scored_every_test_example_once(runs, reference, source):
  """Both processes report the score of the whole test split: that of one
  process evaluating the final checkpoint on all 1000 examples."""
  workdir, records = runs
  setup, _ = reference
  config = multihost_worker.job_config(TOTAL_STEPS)
  _, state = restored(workdir, setup)
  eval_data = input_pipeline.eval_dataset(
    source,
    config.pp,
    batch_size=config.batch_eval,
    hosts=input_pipeline.Hosts(0, 1, jax.local_device_count()),
  )
  expected = helpers.evaluate(setup, state.params, eval_data)
  assert expected['examples'] == source.num_examples(config.pp.test) == 1000
  with open(os.path.join(workdir, results_lib.RESULTS_FILE)) as f:
    written = json.load(f)
  for scores in [written] + [r['results'] for r in records[TOTAL_STEPS]]:
    assert scores['test_examples'] == 1000
    assert scores['test_accuracy'] == pytest.approx(expected['accuracy'])
    assert scores['test_loss'] == pytest.approx(expected['loss'], rel=1e-5)


@pytest.mark.slow
def test_only_process_0_wrote_results_metrics_and_task_file(runs):
  """Process 1 wrote nothing outside the checkpoints; process 0 wrote the
  run's files (seen by the same audit, so it does see writes)."""
  workdir, records = runs
  config = multihost_worker.job_config(TOTAL_STEPS)
  outputs = {
    results_lib.RESULTS_FILE,
    metrics.METRICS_FILE,
    results_lib.CONFIG_FILE,
    config.finetune.task_file,
  }
  for run in records.values():
    first, second = run
    assert second['writes'] == []
    written = {os.path.basename(path) for _, path in first['writes']}
    assert outputs <= {re.sub(r'^\.tmp-\w+-', '', p) for p in written}
  # TensorBoard writes from C++, which the audit does not see: its files
  # are named after the writing process's id.
  events = [n for n in os.listdir(workdir) if n.startswith('events.out.')]
  assert len(events) == len(records)  # One per run.
  pids = {str(run[0]['os_pid']) for run in records.values()}
  writers = {re.search(r'\.(\d+)\.\d+\.v2$', name)[1] for name in events}
  assert writers == pids, events
  assert set(os.listdir(workdir)) == outputs | set(events) | {
    train_state.CHECKPOINT_SUBDIR,
    workdir_lock.LOCK_FILE,  # Process 0's (the lock of both).
  }


@pytest.mark.slow
def test_both_processes_resumed_from_the_checkpoint(runs):
  """Both processes restored step 2 in the 4-step run: their pipelines
  start there and the results say so."""
  workdir, records = runs
  for total, start in ((FIRST_STEPS, 0), (TOTAL_STEPS, FIRST_STEPS)):
    for record in records[total]:
      assert [c['start_step'] for c in record['pipelines']['train']] == [start]
      assert record['results']['resumed_from_step'] == start
  with open(os.path.join(workdir, results_lib.RESULTS_FILE)) as f:
    assert json.load(f)['resumed_from_step'] == FIRST_STEPS


def test_distributed_without_a_cluster_is_a_config_error(tmp_path):
  """`--config.distributed=True` with no cluster and no variables exits
  with one line that names the variables to set."""
  process = subprocess.run(
    [
      sys.executable,
      '-m',
      'vit_jax.main',
      '--config=configs/scratch.py:mnist5k',
      '--config.distributed=True',
      f'--workdir={tmp_path}',
    ],
    cwd=REPO,
    env=helpers.process_env(1),
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert process.returncode == 1, process.stderr[-3000:]
  (line,) = [x for x in process.stderr.splitlines() if x.startswith('error:')]
  for name in (
    main_lib.COORDINATOR_ADDRESS_ENV,
    main_lib.NUM_PROCESSES_ENV,
    main_lib.PROCESS_ID_ENV,
  ):
    assert name in line
  assert 'Traceback' not in process.stderr


def test_bad_process_count_names_the_variable():
  with pytest.raises(main_lib.ConfigError, match='JAX_NUM_PROCESSES=.two.'):
    main_lib.initialize_distributed({main_lib.NUM_PROCESSES_ENV: 'two'})
