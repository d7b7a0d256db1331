"""Atomic file writing: a reader sees the old file or the new one, never half.

Every checkpoint writer of this package goes through `atomic_path`, so a
crash (or a full disk) while writing leaves the previous file intact.
"""

import contextlib
import json
import os
import uuid
import zipfile
from typing import Any, Dict, Iterator, Mapping

import numpy as np

from vit_jax.errors import CheckpointError

_READ_ERRORS = (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary path beside `path`; renames it over `path` on success.

  The temporary file lives in the same directory (so the rename stays on one
  file system) and ends with `path`'s own name (so writers that append an
  extension, like `np.savez`, leave it alone). It is flushed to disk before
  the rename and removed if the body raises.
  """
  directory, name = os.path.split(os.path.abspath(os.fspath(path)))
  temporary = os.path.join(directory, f'.tmp-{uuid.uuid4().hex[:12]}-{name}')
  try:
    yield temporary
    with open(temporary, 'rb') as f:
      os.fsync(f.fileno())
    os.replace(temporary, path)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)


def read_npz(path: str) -> Dict[str, np.ndarray]:
  """Every array of the `.npz` at `path`, as stored (no pickles).

  Raises:
    CheckpointError: naming `path` if it is missing, truncated, corrupt, a
      single `.npy` array, or holds pickled objects instead of arrays.
  """
  if not os.path.exists(path):
    raise CheckpointError(f'{path}: no such file; check the path.')
  try:
    archive = np.load(path, allow_pickle=False)
    if not isinstance(archive, np.lib.npyio.NpzFile):
      raise CheckpointError(
          f'{path}: holds a single array, not an .npz archive of named arrays.')
    with archive:
      return {key: archive[key] for key in archive.files}
  except _READ_ERRORS as e:
    raise CheckpointError(
        f'{path}: not a readable .npz archive ({type(e).__name__}: {e}). The '
        'file may be truncated (write or download it again) or not a '
        'checkpoint.') from e


def write_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
  """`np.savez(path, **arrays)`, atomically."""
  with atomic_path(path) as temporary:
    np.savez(temporary, **arrays)


def write_json(path: str, value: Any) -> None:
  """Writes `value` as indented JSON, atomically (results, reports)."""
  with atomic_path(path) as temporary:
    with open(temporary, 'w') as f:
      json.dump(value, f, indent=2)
