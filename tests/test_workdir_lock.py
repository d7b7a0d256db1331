"""One run per workdir: the lock, held and refused across real processes,
on a local folder and in a bucket (the GCS emulator), with the takeover of
a lock left by a killed run."""

import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Optional

import pytest

from tests import gcs_emulator
from vit_jax import paths
from vit_jax import workdir_lock
from vit_jax.errors import WorkdirInUse

REPO = pathlib.Path(__file__).resolve().parent.parent
BUCKET = f'gs://{gcs_emulator.BUCKET}'

# A process that takes the lock of argv[1], says so, and holds it until
# killed (heartbeat and staleness in seconds: argv[2], argv[3]); named
# argv[4] as its host, if given (a process of another machine).
HOLDER = """
import socket, sys, time
if len(sys.argv) > 4:
  socket.gethostname = lambda: sys.argv[4]
from vit_jax import workdir_lock
lock = workdir_lock.WorkdirLock(
  sys.argv[1], heartbeat_s=float(sys.argv[2]), stale_after_s=float(sys.argv[3])
)
with lock:
  print('held', flush=True)
  time.sleep(600)
"""


def start_holder(
  workdir: str,
  heartbeat_s: float = 30,
  stale_after_s: float = 300,
  host: Optional[str] = None,
) -> subprocess.Popen:
  """A process holding `workdir`'s lock, once this returns."""
  process = subprocess.Popen(
    [
      sys.executable,
      '-c',
      HOLDER,
      workdir,
      str(heartbeat_s),
      str(stale_after_s),
    ]
    + ([host] if host else []),
    cwd=REPO,
    stdout=subprocess.PIPE,
    text=True,
  )
  assert process.stdout.readline() == 'held\n'
  return process


def kill(process: subprocess.Popen) -> None:
  process.send_signal(signal.SIGKILL)
  process.wait()


def assert_names_holder(error: WorkdirInUse, process: subprocess.Popen):
  message = str(error)
  assert f'process {process.pid} on host ' in message
  assert 'in use by another run' in message and 'started 20' in message


def test_a_second_run_is_refused_and_a_killed_holder_frees_the_workdir(
  tmp_path,
):
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  holder = start_holder(workdir)
  try:
    with pytest.raises(WorkdirInUse) as error:
      with workdir_lock.WorkdirLock(workdir):
        pass
    assert_names_holder(error.value, holder)
  finally:
    kill(holder)  # kill -9: the kernel releases the lock.
  with workdir_lock.WorkdirLock(workdir) as lock:
    lock.check()
    with pytest.raises(WorkdirInUse):  # Held by this process now.
      workdir_lock.WorkdirLock(workdir).__enter__()


def test_main_on_a_workdir_in_use_exits_at_once_in_one_line(tmp_path):
  """`python -m vit_jax.main` is refused before it reads the workdir or
  builds anything, and leaves the holder's files alone."""
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'config.json').write_text('{"the holder": "record"}')
  holder = start_holder(str(workdir))
  try:
    process = subprocess.run(
      [
        sys.executable,
        '-m',
        'vit_jax.main',
        f'--config={REPO}/configs/scratch.py:digits',
        f'--workdir={workdir}',
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
    )
  finally:
    kill(holder)
  assert process.returncode == 1, process.stderr[-2000:]
  assert 'Traceback' not in process.stderr
  (line,) = [x for x in process.stderr.splitlines() if x.startswith('error:')]
  assert f'{workdir} is in use by another run (process {holder.pid}' in line
  assert sorted(os.listdir(workdir)) == ['config.json', 'run.lock']
  assert (workdir / 'config.json').read_text() == '{"the holder": "record"}'


@pytest.fixture(scope='module')
def emulator():
  """The GCS emulator, with this process (and its children) pointed at it."""
  server = gcs_emulator.GcsEmulator()
  with pytest.MonkeyPatch.context() as patch:
    for key, value in server.environment().items():
      patch.setenv(key, value)
    yield server
  server.stop()


def test_bucket_lock_is_refused_while_fresh_and_taken_over_when_stale(
  emulator,
):
  """A holder of another machine killed with -9 leaves its lock object;
  it is refused while its last heartbeat is recent, and taken over once it
  is older than `stale_after_s`; the new holder deletes it on release."""
  workdir = f'{BUCKET}/locked-run'
  stale_after_s = 3.0
  holder = start_holder(workdir, 0.5, stale_after_s, host='tpu-vm-7')
  time.sleep(1.5)  # Heartbeats refresh the object meanwhile.
  with pytest.raises(WorkdirInUse) as error:
    with workdir_lock.WorkdirLock(workdir, stale_after_s=stale_after_s):
      pass
  assert f'process {holder.pid} on host tpu-vm-7' in str(error.value)
  assert 'refreshed 0 s ago' in str(error.value)
  kill(holder)
  killed_at = time.monotonic()
  lock_object = paths.join(workdir, workdir_lock.LOCK_FILE)
  assert paths.exists(lock_object)  # Nothing released it.
  with pytest.raises(WorkdirInUse):
    with workdir_lock.WorkdirLock(workdir, stale_after_s=stale_after_s):
      pass
  time.sleep(max(0.0, stale_after_s + 1 - (time.monotonic() - killed_at)))
  with workdir_lock.WorkdirLock(workdir, stale_after_s=stale_after_s) as lock:
    record = workdir_lock.Holder.from_bytes(paths.read_bytes(lock_object))
    assert record.pid == os.getpid()
    lock.check()
  assert not paths.exists(lock_object)


def test_bucket_lock_of_a_dead_process_of_this_host_is_taken_at_once(
  emulator,
):
  """A run killed and restarted on the same machine need not wait: the
  holder's process is gone, which this host can tell."""
  workdir = f'{BUCKET}/restarted-run'
  holder = start_holder(workdir)
  with pytest.raises(WorkdirInUse):  # Alive: refused.
    with workdir_lock.WorkdirLock(workdir):
      pass
  kill(holder)
  with workdir_lock.WorkdirLock(workdir):
    record = workdir_lock.Holder.from_bytes(
      paths.read_bytes(paths.join(workdir, workdir_lock.LOCK_FILE))
    )
    assert record.pid == os.getpid()


def test_a_holder_that_stopped_refreshing_learns_it_lost_the_lock(emulator):
  """Of two runs, the one whose lock was taken over stops at its next
  write (`check`) instead of writing over the other's files."""
  workdir = f'{BUCKET}/slow-holder'
  slow = workdir_lock.WorkdirLock(workdir, heartbeat_s=600, stale_after_s=1)
  with slow:
    time.sleep(1.5)  # No heartbeat within stale_after_s.
    with workdir_lock.WorkdirLock(workdir, stale_after_s=1):
      slow._lock._refresh()  # noqa: SLF001 (its next heartbeat, now)
      with pytest.raises(WorkdirInUse, match='taken over by another run'):
        slow.check()
