"""One run per workdir: the lock, held and refused across real processes,
on a local folder and in a bucket (the GCS emulator), with the takeover of
a lock left by a killed run."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
from typing import Optional

import pytest

from tests import gcs_emulator
from tests import helpers
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


def test_two_runs_started_together_one_trains_one_is_refused(tmp_path):
  """Without the lock both trained into one workdir (Orbax failed mid-save
  in one, the other hung). Now the first to lock trains to the end; the
  other stops at once with one line naming it."""
  workdir = tmp_path / 'run'
  runs = [
    subprocess.Popen(
      helpers.tiny_digits_main(workdir, total_steps=4),
      cwd=REPO,
      env=helpers.cpu_env(),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
    )
    for _ in range(2)
  ]
  outcomes = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
  codes = sorted(code for code, _ in outcomes)
  assert codes == [0, 1], [stderr[-2000:] for _, stderr in outcomes]
  (winner, _), (_, (_, stderr)) = sorted(
    zip(runs, outcomes), key=lambda pair: pair[1][0]
  )
  assert 'Traceback' not in stderr
  (line,) = [x for x in stderr.splitlines() if x.startswith('error:')]
  assert f'{workdir} is in use by another run (process {winner.pid}' in line
  assert json.loads((workdir / 'results.json').read_text())['steps'] == 4
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']


def test_bucket_lock_is_refused_while_fresh_and_taken_over_when_stale(
  emulator,
):
  """A holder of another machine killed with -9 leaves its lock object;
  it is refused while its last heartbeat is recent, and taken over once it
  is older than `stale_after_s`; the new holder deletes it on release.

  Staleness is the contender's judgement, so the refusals use a long
  `stale_after_s` (a loaded machine cannot make them stale) and the
  takeover a short one."""
  workdir = f'{BUCKET}/locked-run'
  fresh_for_s, stale_after_s = 120.0, 1.0
  holder = start_holder(workdir, 0.5, fresh_for_s, host='tpu-vm-7')
  try:
    time.sleep(1.5)  # Heartbeats refresh the object meanwhile.
    with pytest.raises(WorkdirInUse) as error:
      with workdir_lock.WorkdirLock(workdir, stale_after_s=fresh_for_s):
        pass
  finally:
    kill(holder)
  assert f'process {holder.pid} on host tpu-vm-7' in str(error.value)
  # A heartbeat can land while this run tries a takeover; the refusal then
  # comes from the failed re-creation, which names the holder without its
  # age.
  refreshed = re.search(r'refreshed (\d+) s ago', str(error.value))
  assert refreshed is None or int(refreshed[1]) <= fresh_for_s
  lock_object = paths.join(workdir, workdir_lock.LOCK_FILE)
  assert paths.exists(lock_object)  # Nothing released it.
  with pytest.raises(WorkdirInUse, match='refreshed'):  # Dead, still fresh.
    with workdir_lock.WorkdirLock(workdir, stale_after_s=fresh_for_s):
      pass
  time.sleep(stale_after_s + 0.5)  # No heartbeat since the kill.
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
