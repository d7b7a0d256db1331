"""One run per workdir: a lock that a second run on the same workdir meets.

Two runs writing one workdir would overwrite each other's checkpoints and
results (Orbax fails mid-save when both write a step; a run started later
trains over the other's files). So a training run holds the workdir's lock
from before it reads the workdir until its results are written, and a
second run is refused at once with the holder's host, process id and start
time.

* On a local disk (or a shared file system with POSIX locks) the lock is an
  exclusive `fcntl.flock` on `WORKDIR/run.lock`. The kernel releases it when
  the holder exits in any way, `kill -9` included, so no lock outlives its
  run; the file itself stays and names the last holder.
* In a bucket (`gs://`) nothing is released by a process's death. The lock
  is the object `WORKDIR/run.lock`, created only if absent (GCS's
  `ifGenerationMatch=0` precondition), and refreshed by its holder every
  `heartbeat_s` (a metadata update conditioned on the object's generation,
  which fails once another run took the lock over). A lock whose last
  refresh is older than `stale_after_s` (by the bucket's clock, against
  this host's) was left by a run that died, and so was one whose holder is
  a process of this host that no longer runs (a run killed and restarted
  on the same machine need not wait). Either is taken over: deleted under
  a generation and metageneration precondition, so that of two runs taking
  it over at once, one wins, and re-created.

With several processes, process 0 takes the lock for all of them, and all
learn whether it did.
"""

import dataclasses
import datetime
import fcntl
import json
import os
import socket
import threading
from typing import Optional, Tuple
import uuid

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from vit_jax import paths
from vit_jax.errors import WorkdirInUse

LOCK_FILE = 'run.lock'
# A bucket lock's refresh interval, and the age after which a lock that
# was not refreshed counts as left by a dead run.
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


@dataclasses.dataclass(frozen=True)
class Holder:
  """Who holds a lock: a host, a process on it, when it started, and a
  token unique to this holding."""

  host: str
  pid: int
  started: str
  token: str

  @classmethod
  def this_process(cls) -> 'Holder':
    """The holder this process would be, started now."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return cls(
      host=socket.gethostname(),
      pid=os.getpid(),
      started=now.strftime('%Y-%m-%d %H:%M:%S UTC'),
      token=uuid.uuid4().hex,
    )

  @classmethod
  def from_bytes(cls, data: bytes) -> Optional['Holder']:
    """The holder recorded in a lock's bytes, None if they name none."""
    try:
      record = json.loads(data.decode('utf-8'))
      return cls(**{f.name: record[f.name] for f in dataclasses.fields(cls)})
    except (ValueError, KeyError, TypeError):
      return None

  def to_bytes(self) -> bytes:
    return json.dumps(dataclasses.asdict(self)).encode('utf-8')

  def describe(self) -> str:
    return f'process {self.pid} on host {self.host}, started {self.started}'

  def ended_here(self) -> bool:
    """Whether this holder is a process of this host that no longer runs
    (killed, say, and restarted on the same machine): its lock is left
    over for sure, with no need to wait for it to go stale."""
    if self.host != socket.gethostname() or self.pid == os.getpid():
      return False
    try:
      os.kill(self.pid, 0)
    except ProcessLookupError:
      return True
    except PermissionError:  # It runs, as another user.
      return False
    return False


def _in_use(
  lock_path: str, holder: Optional[Holder], detail: str = ''
) -> WorkdirInUse:
  """The error for a workdir whose lock `holder` holds."""
  who = holder.describe() if holder else 'a process that is just starting'
  return WorkdirInUse(
    f'{os.path.dirname(lock_path) or "."} is in use by another run ({who}; '
    f'lock {lock_path}){detail}. Two runs in one workdir would overwrite '
    "each other's checkpoints and results: wait for it to finish, stop it, "
    'or use another --workdir.'
  )


class _FileLock:
  """An exclusive `flock` on a local file, released by the kernel when the
  process ends."""

  def __init__(self, path: str):
    self.path = path
    self._fd: Optional[int] = None

  def acquire(self, holder: Holder) -> None:
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      other = Holder.from_bytes(os.pread(fd, 4096, 0))
      os.close(fd)
      raise _in_use(self.path, other) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder.to_bytes(), 0)
    os.fsync(fd)
    self._fd = fd

  def lost(self) -> Optional[str]:
    return None  # A kernel lock is held until this process releases it.

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # Closing the file releases the flock.
      self._fd = None


class _BucketLock:
  """A lock object in a bucket, created only if absent and kept fresh by a
  heartbeat thread (module docstring)."""

  def __init__(self, path: str, heartbeat_s: float, stale_after_s: float):
    import fsspec  # Only a bucket needs it (gcsfs, as epath uses).

    self.path = path
    self._fs, self._object = fsspec.core.url_to_fs(path)
    self._bucket, _, self._key = self._object.partition('/')
    self._heartbeat_s = heartbeat_s
    self._stale_after_s = stale_after_s
    self._generation: Optional[str] = None
    self._lost: Optional[str] = None
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  def _create(self, holder: Holder) -> bool:
    """Creates the lock object if absent; whether this call created it."""
    try:
      self._fs.pipe_file(self._object, holder.to_bytes(), mode='create')
    except FileExistsError:
      return False
    created = self._fs.info(self._object)
    if Holder.from_bytes(self._fs.cat_file(self._object)) != holder:
      return False  # Another run replaced it in between.
    self._generation = str(created['generation'])
    return True

  def _state(self) -> Optional[Tuple[Optional[Holder], str, str, float]]:
    """The lock object's holder, generation, metageneration and seconds
    since its last refresh; None if there is no lock object."""
    try:
      info = self._fs.info(self._object)
      data = self._fs.cat_file(self._object)
    except FileNotFoundError:
      return None
    updated = datetime.datetime.fromisoformat(
      str(info['updated']).replace('Z', '+00:00')
    )
    age = (
      datetime.datetime.now(datetime.timezone.utc) - updated
    ).total_seconds()
    return (
      Holder.from_bytes(data),
      str(info['generation']),
      str(info['metageneration']),
      age,
    )

  def acquire(self, holder: Holder) -> None:
    if not self._create(holder):
      state = self._state()
      if state is not None:
        other, generation, metageneration, age = state
        if other is not None and other.ended_here():
          why = 'its process no longer runs on this host'
        elif age > self._stale_after_s:
          why = (
            f'it was not refreshed for {age:.0f} s (> '
            f'{self._stale_after_s:.0f} s)'
          )
        else:
          raise _in_use(self.path, other, f', refreshed {age:.0f} s ago')
        logging.warning(
          'Taking over %s from %s: %s.',
          self.path,
          other.describe() if other else 'an unknown holder',
          why,
        )
        self._delete(generation, metageneration)
      if not self._create(holder):
        raise _in_use(
          self.path, Holder.from_bytes(self._fs.cat_file(self._object))
        )
    self._thread = threading.Thread(
      target=self._heartbeat, name='vit_jax-workdir-lock', daemon=True
    )
    self._thread.start()

  def _delete(self, generation: str, metageneration: str) -> bool:
    """Deletes the lock object if it is still that generation and
    metageneration (not refreshed or replaced since); whether it did."""
    try:
      self._fs.call(
        'DELETE',
        'b/{}/o/{}',
        self._bucket,
        self._key,
        ifGenerationMatch=generation,
        ifMetagenerationMatch=metageneration,
      )
    except (FileExistsError, FileNotFoundError):  # 412, 404.
      return False
    return True

  def _refresh(self) -> None:
    """Marks the lock fresh, if it still is this holder's."""
    try:
      self._fs.call(
        'PATCH',
        'b/{}/o/{}',
        self._bucket,
        self._key,
        ifGenerationMatch=self._generation,
        json={'metadata': {'heartbeat': datetime.datetime.now().isoformat()}},
      )
    except (FileExistsError, FileNotFoundError):
      self._lost = (
        f'the lock {self.path} was taken over by another run (this run did '
        f'not refresh it for over {self._stale_after_s:.0f} s)'
      )

  def _heartbeat(self) -> None:
    while not self._stop.wait(self._heartbeat_s) and self._lost is None:
      try:
        self._refresh()
      except Exception as e:  # noqa: BLE001 (retried at the next beat)
        logging.warning('Could not refresh the lock %s: %s', self.path, e)

  def lost(self) -> Optional[str]:
    return self._lost

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if self._generation is not None and self._lost is None:
      state = self._state()
      if state is not None and state[1] == self._generation:
        self._delete(state[1], state[2])
    self._generation = None


class WorkdirLock:
  """Holds `workdir`'s lock while active (module docstring):

    with WorkdirLock(workdir) as lock:
      ...
      lock.check()  # Before writing: still this run's workdir?

  Raises WorkdirInUse on entry if another run holds it.
  """

  def __init__(
    self,
    workdir: str,
    heartbeat_s: float = HEARTBEAT_S,
    stale_after_s: float = STALE_AFTER_S,
  ):
    path = paths.join(workdir, LOCK_FILE)
    self._lock = (
      _BucketLock(path, heartbeat_s, stale_after_s)
      if paths.is_remote(path)
      else _FileLock(path)
    )
    self._primary = jax.process_index() == 0

  def __enter__(self) -> 'WorkdirLock':
    error = None
    if self._primary:
      try:
        self._lock.acquire(Holder.this_process())
      except WorkdirInUse as e:
        error = e
    if jax.process_count() > 1:
      held = multihost_utils.broadcast_one_to_all(np.int32(error is None))
      if not held and error is None:
        error = WorkdirInUse(
          f'{self._lock.path}: process 0 found the workdir in use by '
          'another run (its message says by whom).'
        )
    if error is not None:
      raise error
    return self

  def check(self) -> None:
    """A WorkdirInUse error if another run took the lock over (a bucket
    lock not refreshed in time), so that this run does not write over it."""
    reason = self._lock.lost() if self._primary else None
    if jax.process_count() > 1:
      lost = multihost_utils.broadcast_one_to_all(np.int32(reason is not None))
      if lost and reason is None:
        reason = 'process 0 lost the workdir lock to another run'
    if reason:
      raise WorkdirInUse(
        f'Stopped: {reason}. Its checkpoints and results are its own now; '
        'this run wrote nothing more.'
      )

  def __exit__(self, *exc_info) -> None:
    if self._primary:
      self._lock.release()
