"""A damaged newest checkpoint is skipped, kept aside, and never fatal.

Real Orbax checkpoints of steps 1, 2, 3 are damaged the ways a full disk, a
killed copy or a careless hand leave them; `restore` must return the newest
intact state, bit for bit, keep the damaged files under another name, and
let the run save on. A checkpoint that reads fine but belongs to another
model is not damage, and still stops the run.
"""

import contextlib
import json
import logging
import os
import pathlib
import resource
import shutil
import signal
import subprocess
import sys
import time

import chex
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests import helpers
from vit_jax import main as main_lib
from vit_jax import publish
from vit_jax import results as results_lib
from vit_jax.checkpoint import train_state
from vit_jax.errors import CheckpointError

REPO = pathlib.Path(__file__).resolve().parent.parent
STEPS = (1, 2, 3)


def make_state(step: int) -> dict:
  """A params-like tree of a few thousand float32s, distinct per step."""
  rng = np.random.RandomState(step)
  return {
    'params': {
      'Dense_0': {
        'kernel': rng.randn(64, 48).astype(np.float32),
        'bias': rng.randn(48).astype(np.float32),
      },
      'head': {'kernel': rng.randn(48, 10).astype(np.float32)},
    },
    'step': step,
  }


@pytest.fixture
def workdir(tmp_path) -> pathlib.Path:
  """A workdir with intact checkpoints of `STEPS`."""
  with train_state.TrainCheckpointer(tmp_path) as checkpointer:
    for step in STEPS:
      assert checkpointer.save(step, make_state(step))
  return tmp_path


def files_under(folder: pathlib.Path) -> list:
  """The relative paths of every file under `folder`, sorted."""
  return sorted(
    str(path.relative_to(folder))
    for path in folder.rglob('*')
    if path.is_file()
  )


def largest_data_file(step_dir: pathlib.Path) -> pathlib.Path:
  """The biggest of the item's array data files: tensorstore's OCDBT data
  files `default/ocdbt.process_*/d/*` (it holds the arrays' chunks)."""
  data = [path for path in step_dir.glob('default/**/d/*') if path.is_file()]
  assert data, files_under(step_dir)
  return max(data, key=lambda path: path.stat().st_size)


def delete_data_file(checkpoints: pathlib.Path) -> int:
  largest_data_file(checkpoints / '3').unlink()
  return 3


def truncate_metadata(checkpoints: pathlib.Path) -> int:
  metadata = checkpoints / '3' / 'default' / '_METADATA'
  data = metadata.read_bytes()
  metadata.write_bytes(data[: len(data) // 2])
  return 3


def garble_data_file(checkpoints: pathlib.Path) -> int:
  path = largest_data_file(checkpoints / '3')
  garbage = np.random.RandomState(0).bytes(path.stat().st_size)
  path.write_bytes(garbage)
  return 3


def empty_step_folder(checkpoints: pathlib.Path) -> int:
  for child in (checkpoints / '3').iterdir():
    shutil.rmtree(child) if child.is_dir() else child.unlink()
  return 3


def new_empty_step_folder(checkpoints: pathlib.Path) -> int:
  (checkpoints / '4').mkdir()
  return 4


DAMAGES = (
  delete_data_file,
  truncate_metadata,
  garble_data_file,
  empty_step_folder,
  new_empty_step_folder,
)


@pytest.mark.parametrize('damage', DAMAGES, ids=lambda f: f.__name__)
def test_damaged_newest_step_is_skipped_kept_aside_and_saved_again(
  workdir, damage, caplog
):
  checkpoints = workdir / 'checkpoints'
  damaged = damage(checkpoints)
  left = files_under(checkpoints / str(damaged))
  intact = max(step for step in STEPS if step != damaged)

  with caplog.at_level(logging.WARNING):
    with train_state.TrainCheckpointer(workdir) as checkpointer:
      restored = checkpointer.restore(make_state(0))
      chex.assert_trees_all_equal(restored, make_state(intact))
      assert checkpointer.latest_step() == intact
      assert damaged not in checkpointer.all_steps()

      # The run goes on and saves the damaged step's number again.
      assert checkpointer.save(damaged, make_state(damaged))
      checkpointer.wait_until_finished()
      restored = checkpointer.restore(make_state(0))
      chex.assert_trees_all_equal(restored, make_state(damaged))

  aside = checkpoints / f'{damaged}.damaged'
  assert aside.is_dir() and files_under(aside) == left
  warnings = [
    r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
  ]
  skipped = [w for w in warnings if w.startswith('Skipped the damaged')]
  assert len(skipped) == 1, warnings
  assert f'{checkpoints / str(damaged)} (' in skipped[0]
  assert f'moved it aside to {aside} ' in skipped[0]
  assert skipped[0].endswith(f'resumed from step {intact}.')
  assert '\n' not in skipped[0]


def test_the_aside_name_is_ignored_by_orbax_and_never_overwritten(workdir):
  checkpoints = workdir / 'checkpoints'
  earlier = checkpoints / '3.damaged'  # From an earlier incident.
  earlier.mkdir()
  (earlier / 'note').write_text('keep me')
  truncate_metadata(checkpoints)
  with train_state.TrainCheckpointer(workdir) as checkpointer:
    assert checkpointer.restore(make_state(0))['step'] == 2
  assert (earlier / 'note').read_text() == 'keep me'
  assert (checkpoints / '3.damaged-2' / 'default' / '_METADATA').exists()

  # A new checkpointer neither lists the aside folders as steps nor cleans
  # them up with Orbax's temporary folders, and deletes no more of them
  # when it drops old steps.
  with train_state.TrainCheckpointer(workdir, keep=1) as checkpointer:
    assert checkpointer.all_steps() == [1, 2]
    assert checkpointer.save(5, make_state(5))
  assert sorted(os.listdir(checkpoints)) == ['3.damaged', '3.damaged-2', '5']


def test_a_leftover_temporary_folder_is_removed_and_does_not_hinder(workdir):
  """Orbax (0.12.8) deletes the temporary folders of crashed saves in a
  thread it starts on opening (the first `save` waits for it)."""
  checkpoints = workdir / 'checkpoints'
  leftover = checkpoints / ('4' + ocp.path.atomicity.TMP_DIR_SUFFIX)
  (leftover / 'default').mkdir(parents=True)
  (leftover / 'default' / '_METADATA').write_text('{"tree_meta')
  garble_data_file(checkpoints)
  with train_state.TrainCheckpointer(workdir) as checkpointer:
    chex.assert_trees_all_equal(
      checkpointer.restore(make_state(0)), make_state(2)
    )
    deadline = time.monotonic() + 30
    while leftover.exists() and time.monotonic() < deadline:
      time.sleep(0.05)
    assert not leftover.exists()
    assert checkpointer.save(4, make_state(4))
  assert sorted(os.listdir(checkpoints)) == ['1', '2', '3.damaged', '4']


def test_no_readable_step_is_one_error_and_moves_nothing(workdir):
  checkpoints = workdir / 'checkpoints'
  for step in STEPS:
    metadata = checkpoints / str(step) / 'default' / '_METADATA'
    metadata.write_text('{"tree_metadata": ')
  with train_state.TrainCheckpointer(workdir) as checkpointer:
    with pytest.raises(CheckpointError) as error:
      checkpointer.restore(make_state(0))
  message = str(error.value)
  assert message.startswith(f'No checkpoint in {checkpoints} can be restored')
  for step in STEPS:
    assert f'step {step}: JSONDecodeError: Expecting value' in message
  assert '\n' not in message
  assert sorted(os.listdir(checkpoints)) == ['1', '2', '3']


def test_a_named_damaged_step_is_an_error_without_fallback(workdir):
  checkpoints = workdir / 'checkpoints'
  garble_data_file(checkpoints)
  with train_state.TrainCheckpointer(workdir) as checkpointer:
    with pytest.raises(CheckpointError) as error:
      checkpointer.restore(make_state(0), step=3)
    assert checkpointer.restore(make_state(0), step=2)['step'] == 2
  message = str(error.value)
  assert f'Cannot restore the checkpoint {checkpoints / "3"}: ' in message
  assert 'ZSTD_decompressStream() failed' in message
  assert sorted(os.listdir(checkpoints)) == ['1', '2', '3']


def test_an_intact_checkpoint_of_another_model_is_not_skipped(workdir):
  target = make_state(0)
  target['params']['head']['kernel'] = np.zeros((48, 5), np.float32)
  with train_state.TrainCheckpointer(workdir) as checkpointer:
    with pytest.raises(CheckpointError, match='does not fit') as error:
      checkpointer.restore(target)
  checkpoints = workdir / 'checkpoints'
  assert str(checkpoints / '3') in str(error.value)
  assert 'params/head/kernel: (48, 10) vs (48, 5)' in str(error.value)
  assert sorted(os.listdir(checkpoints)) == ['1', '2', '3']


GARBLED_RECORDS = (
  b'{"total_steps": 4, "mod',
  b'\xff\xfe\x00garbage',
  b'[1, 2]',
)


@pytest.mark.parametrize('content', GARBLED_RECORDS)
def test_a_garbled_config_record_is_a_one_line_error(tmp_path, content):
  path = tmp_path / results_lib.CONFIG_FILE
  path.write_bytes(content)
  with pytest.raises(CheckpointError) as error:
    results_lib.read_config_record(str(tmp_path))
  message = str(error.value)
  assert message.startswith(f'{path} ') and '\n' not in message
  assert 'Restore it from a backup, or move it aside only if' in message


@pytest.mark.parametrize('content', GARBLED_RECORDS)
def test_a_garbled_results_file_is_a_one_line_error(tmp_path, content):
  path = tmp_path / results_lib.RESULTS_FILE
  path.write_bytes(content)
  with pytest.raises(CheckpointError) as error:
    results_lib.finished_results(str(tmp_path))
  message = str(error.value)
  assert message.startswith(f'{path} ') and '\n' not in message
  assert 'run the same command again' in message
  # Publishing reads the file the same way, and fails the same way.
  with pytest.raises(CheckpointError) as published:
    publish.publish(str(tmp_path), str(tmp_path / 'out'))
  assert str(published.value) == message


@contextlib.contextmanager
def file_size_limit(limit: int):
  """Writes past `limit` bytes fail with EFBIG, in this process and those
  it starts: a full disk's failed write, where the test can set it."""
  previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
  try:
    yield
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous)


def test_a_failed_save_is_one_error_naming_the_intact_step(workdir):
  """An asynchronous save that cannot write (a full disk) fails at the
  checkpointer's next call with the step, the reason and the step that
  is intact; that step still restores."""
  noise = np.random.RandomState(4).randn(256, 1024).astype(np.float32)
  big = {'params': {'w': noise}, 'step': 4}  # 1 MB, incompressible.
  with train_state.TrainCheckpointer(workdir) as checkpointer:
    with file_size_limit(64 << 10):
      checkpointer.save(4, big)
      with pytest.raises(CheckpointError) as error:
        checkpointer.wait_until_finished()
    message = str(error.value)
    assert message.startswith(
      f'Cannot write the checkpoint of step 4 in {workdir}/checkpoints ('
    )
    assert 'File too large' in message
    assert message.endswith(
      '; the checkpoint of step 3 is intact. Free space (or fix the '
      'permissions) and run the same command again to resume.'
    )
    assert '\n' not in message
    restored = checkpointer.restore(make_state(0))
  chex.assert_trees_all_equal(restored, make_state(3))


def run_main(workdir: pathlib.Path, total_steps: int):
  """`helpers.tiny_digits_main`: (exit code, stderr)."""
  process = subprocess.run(
    helpers.tiny_digits_main(workdir, total_steps),
    cwd=REPO,
    env=helpers.cpu_env(),
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  return process.returncode, process.stderr


@pytest.mark.slow
def test_main_stops_at_a_failed_save_in_one_line(tmp_path):
  """Orbax's background threads log the failure with tracebacks; the run
  stops at its next report with the checkpointer's one line instead."""
  workdir = tmp_path / 'run'
  with file_size_limit(16 << 10):
    returncode, stderr = run_main(workdir, total_steps=6)
  assert returncode == 1, stderr[-3000:]
  assert 'Traceback' not in stderr, stderr[-3000:]
  (line,) = [x for x in stderr.splitlines() if x.startswith('error:')]
  assert line.startswith(
    f'error: Cannot write the checkpoint of step 2 in {workdir}/checkpoints ('
  )
  assert 'File too large' in line and 'no earlier checkpoint' in line


@pytest.mark.slow
def test_main_resumes_past_a_damaged_newest_checkpoint(tmp_path):
  workdir = tmp_path / 'run'
  returncode, stderr = run_main(workdir, total_steps=4)
  assert returncode == 0, stderr[-3000:]
  checkpoints = workdir / 'checkpoints'
  assert sorted(os.listdir(checkpoints)) == ['2', '4']
  garble = largest_data_file(checkpoints / '4')
  garble.write_bytes(np.random.RandomState(0).bytes(garble.stat().st_size))

  returncode, stderr = run_main(workdir, total_steps=6)
  assert returncode == 0, stderr[-3000:]
  assert 'Traceback' not in stderr, stderr[-3000:]
  skipped = [line for line in stderr.splitlines() if 'Skipped the' in line]
  assert len(skipped) == 1, stderr[-3000:]
  assert f'checkpoint {checkpoints / "4"} (' in skipped[0]
  # Tensorstore's own error, not the spec Orbax wraps it in.
  assert 'ZSTD_decompressStream() failed' in skipped[0]
  assert f'Resuming from step 2 in {checkpoints}' in stderr
  results = json.loads((workdir / 'results.json').read_text())
  assert results['resumed_from_step'] == 2 and results['steps'] == 6
  assert sorted(os.listdir(checkpoints)) == ['2', '4', '4.damaged', '6']


def run_two_processes(workdir: pathlib.Path, out: pathlib.Path) -> list:
  """`tests.checkpoint_damage_worker` on 2 CPU processes of one device each
  in the shared `workdir`; their records, by process index. Both are killed
  once one fails or the time is up (the other would wait for it)."""
  port = helpers.free_port()
  env = helpers.process_env(1)
  processes, logs = [], []
  for index in range(2):
    logs.append(out / f'process{index}.log')
    process_env = {
      **env,
      main_lib.COORDINATOR_ADDRESS_ENV: f'127.0.0.1:{port}',
      main_lib.NUM_PROCESSES_ENV: '2',
      main_lib.PROCESS_ID_ENV: str(index),
    }
    with open(logs[-1], 'w') as log:
      processes.append(
        subprocess.Popen(
          [
            sys.executable,
            '-m',
            'tests.checkpoint_damage_worker',
            str(workdir),
            str(out / f'process{index}.json'),
          ],
          cwd=REPO,
          env=process_env,
          stdout=log,
          stderr=subprocess.STDOUT,
          start_new_session=True,
        )
      )
  deadline = time.monotonic() + 180
  try:
    while any(p.poll() is None for p in processes):
      if any(p.poll() not in (None, 0) for p in processes):
        break
      if time.monotonic() > deadline:
        break
      time.sleep(0.2)
  finally:
    for process in processes:
      if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
  codes = [p.returncode for p in processes]
  tails = '\n'.join(log.read_text()[-3000:] for log in logs)
  assert codes == [0, 0], tails
  return [json.loads((out / f'process{i}.json').read_text()) for i in (0, 1)]


@pytest.mark.slow
def test_two_processes_skip_the_same_step_and_move_it_once(tmp_path):
  """Every process restores step 2; process 0 alone moves step 3 aside,
  and both list the steps afresh, so step 3 is saved again."""
  out = tmp_path / 'out'
  out.mkdir()
  records = run_two_processes(tmp_path / 'run', out)
  for record in records:
    assert record['restored'] == 2 and record['steps'] == [1, 2]
    assert record['listing'] == ['1', '2', '3.damaged']
    assert record['restored_again'] == 3
    assert record['final_listing'] == ['1', '2', '3', '3.damaged']
