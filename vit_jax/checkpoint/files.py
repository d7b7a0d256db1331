"""Atomic file writing: a reader sees the old file or the new one, never half.

Every checkpoint writer of this package goes through `atomic_path`, so a
crash (or a full disk) while writing leaves the previous file intact.
"""

import contextlib
import os
import uuid
from typing import Iterator, Mapping

import numpy as np


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


def write_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
  """`np.savez(path, **arrays)`, atomically."""
  with atomic_path(path) as temporary:
    np.savez(temporary, **arrays)
