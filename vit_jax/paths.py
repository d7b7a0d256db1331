"""Every file the project reads or writes, on a local disk or in a bucket.

Paths are strings: a local path or a URL such as `gs://bucket/run`. All
access goes through `etils.epath` (what Orbax uses for its own files), here
(and in `vit_jax.workdir_lock`, for the object preconditions epath lacks),
so a `gs://` pretrained_dir, workdir, published folder, image folder or
prediction output works wherever a local one does.

Writes are whole-file and atomic, with a guarantee that depends on where:

* on a local disk, the bytes go to a temporary file beside the target, are
  flushed, and the file is renamed over the target: a crash (or a full disk)
  leaves the old file or the new one, never half;
* on an object store (GCS), the bytes are sent as one upload of the whole
  object, which replaces the previous object only once complete: readers
  see the old object or the new one. A rename there is a copy and a delete,
  so no temporary object is used. Appending is not possible either; files
  that grow (metrics.jsonl, TensorBoard events) are rewritten whole.

Listings of bucket folders are not cached (gcsfs would keep them for the
life of the process, blind to what other processes write since).

For gs:// this module makes epath use gcsfs rather than `tf.io.gfile`
(`EPATH_USE_TF=false`, unless the environment sets it): TensorFlow's GCS
client always talks to storage.googleapis.com and cannot be pointed at a
local GCS emulator, while gcsfs (and tensorstore, Orbax's array store)
honour `STORAGE_EMULATOR_HOST`, so the bucket path is the one that is
tested. epath reads the variable when it first opens a gs:// path; every
module that opens files imports this one, so the choice is made before.
"""

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from typing import Any, BinaryIO, Iterator, List, Union
import uuid

os.environ.setdefault('EPATH_USE_TF', 'false')

import fsspec.config  # noqa: E402

# gcsfs caches folder listings for the life of the process, so objects
# that another process wrote since stay unseen: a resumed run's newer
# checkpoints, a lock taken over. Every listing asks the bucket instead.
fsspec.config.conf.setdefault('gs', {}).setdefault('use_listings_cache', False)

from etils import epath  # noqa: E402 (after the backend choice above)

from vit_jax.errors import OutputError  # noqa: E402

PathLike = Union[str, os.PathLike]

# Schemes epath serves through fsspec; a path with one is in a bucket.
REMOTE_SCHEMES = ('gs://', 's3://', 'az://')


def is_remote(path: PathLike) -> bool:
  """Whether `path` is in an object store (`gs://...`) rather than on disk."""
  return os.fspath(path).startswith(REMOTE_SCHEMES)


def join(base: PathLike, *names: str) -> str:
  """`base/name/...`, keeping a `gs://` prefix intact."""
  return os.fspath(epath.Path(base).joinpath(*names))


def name(path: PathLike) -> str:
  """The last component: `b.npz` for `gs://a/b.npz` and for `a/b.npz/`."""
  return epath.Path(path).name


def absolute(path: PathLike) -> str:
  """`path` made absolute on a disk; a bucket URL as it is."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(path)


def exists(path: PathLike) -> bool:
  """Whether a file or folder is at `path`. In a bucket, a folder exists
  once an object is written under it."""
  return epath.Path(path).exists()


def is_dir(path: PathLike) -> bool:
  return epath.Path(path).is_dir()


def listdir(path: PathLike) -> List[str]:
  """The names in folder `path`, sorted; [] if it holds nothing."""
  folder = epath.Path(path)
  if not folder.is_dir():
    return []
  return sorted(child.name for child in folder.iterdir())


def size(path: PathLike) -> int:
  """The size of file `path` in bytes."""
  return epath.Path(path).stat().length


def makedirs(path: PathLike) -> None:
  """Creates folder `path` and its parents on a disk; nothing to do in a
  bucket, whose folders are name prefixes of the objects in them."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def open_file(path: PathLike) -> BinaryIO:
  """A seekable binary file object on `path`, for reading. A bucket's object
  is downloaded once, into memory: readers that seek (zip archives such as
  `.npz`) would otherwise send one request per seek."""
  if is_remote(path):
    return io.BytesIO(read_bytes(path))
  return open(path, 'rb')


@contextlib.contextmanager
def local_file(path: PathLike) -> Iterator[str]:
  """Yields a local path with the contents of file `path`: `path` itself on
  a disk, a downloaded temporary copy (removed after) for a bucket's object,
  for readers that take only a file name (safetensors' memory-mapped one)."""
  if not is_remote(path):
    yield os.fspath(path)
    return
  with tempfile.TemporaryDirectory(prefix='vit_jax-download-') as directory:
    local = os.path.join(directory, name(path))
    with open(local, 'wb') as f:
      f.write(read_bytes(path))
    yield local


def read_bytes(path: PathLike) -> bytes:
  return epath.Path(path).read_bytes()


def read_text(path: PathLike) -> str:
  return epath.Path(path).read_text(encoding='utf-8')


def read_json(path: PathLike) -> Any:
  return json.loads(read_text(path))


def sha256(path: PathLike) -> str:
  """The SHA-256 of the file's bytes, in hex: a fingerprint that tells
  whether two records name the same file contents."""
  digest = hashlib.sha256()
  with epath.Path(path).open('rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def write_bytes(path: PathLike, data: bytes) -> None:
  """Writes `data` to `path` atomically (see the module docstring); an
  OutputError naming the file if it cannot (a full disk, no permission)."""
  path = os.fspath(path)
  try:
    _write_atomically(path, data)
  except OSError as e:
    reason = e.strerror or str(e) or type(e).__name__
    raise OutputError(
      f'Cannot write {path}: {reason}. Its previous version, if any, is '
      'unchanged; free space (or fix the permissions) and run again.'
    ) from e


def _write_atomically(path: str, data: bytes) -> None:
  if is_remote(path):
    epath.Path(path).write_bytes(data)
    return
  directory, filename = os.path.split(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  temporary = os.path.join(
    directory, f'.tmp-{uuid.uuid4().hex[:12]}-{filename}'
  )
  try:
    with open(temporary, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)


def write_text(path: PathLike, text: str) -> None:
  """Writes `text` (UTF-8) to `path` atomically."""
  write_bytes(path, text.encode('utf-8'))


def write_json(path: PathLike, value: Any) -> None:
  """Writes `value` as indented JSON to `path` atomically."""
  write_text(path, json.dumps(value, indent=2))


def remove_tree(path: PathLike) -> None:
  """Deletes folder `path` and everything in it, if it exists."""
  folder = epath.Path(path)
  if folder.exists():
    folder.rmtree()


def copy_file(source: PathLike, destination: PathLike) -> None:
  """Copies one file, between a disk and a bucket in either direction."""
  write_bytes(destination, read_bytes(source))


@contextlib.contextmanager
def staged_folder(out: PathLike, last: str) -> Iterator[str]:
  """Yields a local folder to fill; it becomes folder `out` on success.

  On a disk the staging folder sits beside `out` and is renamed to it: `out`
  appears whole or not at all. For a bucket the files are uploaded one by
  one, file `last` after all others, so a reader that opens `last` first
  finds a complete folder. On an error nothing reaches `out`. A local
  `out` gets the permissions `os.makedirs` would give it (the umask's).
  """
  out = os.fspath(out)
  if is_remote(out):
    with tempfile.TemporaryDirectory(prefix='vit_jax-stage-') as staging:
      yield staging
      names = sorted(os.listdir(staging), key=lambda n: (n == last, n))
      for filename in names:
        copy_file(os.path.join(staging, filename), join(out, filename))
    return
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  # Not tempfile.mkdtemp: its 0700 would stay on `out` after the rename.
  # mkdir gives what any new folder gets (0777 less the umask); the
  # random name keeps concurrent stagings apart (mkdir fails on a clash).
  staging = os.path.join(parent, f'.tmp-stage-{uuid.uuid4().hex[:12]}')
  os.mkdir(staging)
  try:
    yield staging
    os.rename(staging, out)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def rename(source: PathLike, destination: PathLike) -> None:
  """Renames file or folder `source` to `destination`, which must not exist.
  In a bucket this copies every object and deletes the originals."""
  epath.Path(source).rename(destination)
