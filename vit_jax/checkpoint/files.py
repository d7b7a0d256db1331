"""Checkpoint files: `.npz` and `.safetensors` archives, read and written.

Readers return flat `{name: array}` dicts and raise a `CheckpointError`
naming the file, and saying what to do, for a missing, truncated or foreign
file. Every writer goes through `atomic_path`, so a crash (or a full disk)
while writing leaves the previous file intact: a reader sees the old file or
the new one, never half.
"""

import contextlib
import json
import os
from typing import Any, Dict, Iterator, Mapping, Optional, Union
import uuid
import zipfile
import zlib

import numpy as np
import safetensors
import safetensors.numpy

from vit_jax.errors import CheckpointError

PathLike = Union[str, os.PathLike]

# What numpy and zipfile raise for a file that is not a whole .npz archive.
_NPZ_ERRORS = (
  zipfile.BadZipFile,
  zlib.error,
  EOFError,
  OSError,
  ValueError,
  KeyError,
)
_HALF_PRECISION = ('float16', 'bfloat16')


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


def read_npz(path: PathLike, *, float32: bool = False) -> Dict[str, np.ndarray]:
  """Every array of the `.npz` at `path`, as stored (no pickles).

  Args:
    path: the archive.
    float32: if True, floating-point arrays (float16, bfloat16, float64)
      become float32, the dtype of Flax parameters.

  Raises:
    CheckpointError: naming `path` if it is missing, empty, truncated,
      corrupt, not an `.npz` archive (a single `.npy` array, random bytes), or
      holds pickled objects instead of arrays.
  """
  path = os.fspath(path)
  _check_is_file(path)
  not_readable = (
    f'{path}: not a readable .npz archive; it is truncated '
    '(write or download it again) or not a checkpoint.'
  )
  try:
    archive = np.load(path, allow_pickle=False)
  except _NPZ_ERRORS as e:  # numpy's text (of pickles, say) would mislead.
    raise CheckpointError(not_readable) from e
  if not isinstance(archive, np.lib.npyio.NpzFile):
    raise CheckpointError(
      f'{path}: holds a single array, not an .npz archive of named arrays.'
    )
  arrays = {}
  with archive:
    for key in archive.files:
      try:
        arrays[key] = archive[key]
      except _NPZ_ERRORS as e:
        if isinstance(e, ValueError) and 'allow_pickle' in str(e):
          raise CheckpointError(
            f'{path}: {key!r} holds pickled Python objects, not an array; '
            'only numeric arrays are read (pickles can run code).'
          ) from e
        raise CheckpointError(not_readable) from e
  if not arrays:
    raise CheckpointError(f'{path}: the archive holds no arrays.')
  if float32:
    arrays = {key: _as_float32(value) for key, value in arrays.items()}
  return arrays


def _check_is_file(path: str) -> None:
  """A CheckpointError naming `path` if it is missing or a folder."""
  if os.path.isdir(path):
    raise CheckpointError(f'{path}: is a folder, not a checkpoint file.')
  if not os.path.exists(path):
    raise CheckpointError(f'{path}: no such file; check the path.')


def _as_float32(value: np.ndarray) -> np.ndarray:
  """float16/bfloat16/float64 arrays become float32 (Flax params' dtype)."""
  if value.dtype.kind == 'f' or value.dtype.name == 'bfloat16':
    return value.astype(np.float32)
  return value


def write_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
  """`np.savez(path, **arrays)`, atomically."""
  with atomic_path(path) as temporary:
    np.savez(temporary, **arrays)


def write_json(path: str, value: Any) -> None:
  """Writes `value` as indented JSON, atomically (results, reports)."""
  with atomic_path(path) as temporary:
    with open(temporary, 'w') as f:
      json.dump(value, f, indent=2)


def read_safetensors(path: PathLike) -> Dict[str, np.ndarray]:
  """Every tensor of a safetensors file; float16 and bfloat16 become float32.

  Widening is exact, and spares callers bfloat16, which numpy lacks.

  Raises:
    CheckpointError: naming the file, when it is missing, unreadable,
      truncated or not in the safetensors format.
  """
  path = os.fspath(path)
  _check_is_file(path)
  try:
    flat = safetensors.numpy.load_file(path)
  except (safetensors.SafetensorError, OSError) as e:
    raise CheckpointError(
      f'{path}: not a readable safetensors file ({e}). It may be truncated '
      '(an interrupted download: fetch it again) or in another format (a '
      'pickled .bin/.pth file: convert it to safetensors).'
    ) from e
  return {
    key: value.astype(np.float32)
    if value.dtype.name in _HALF_PRECISION
    else value
    for key, value in flat.items()
  }


def write_safetensors(
  path: PathLike,
  flat: Mapping[str, Any],
  metadata: Optional[Mapping[str, str]] = None,
) -> None:
  """Writes `flat` to `path` atomically (see `atomic_path`).

  Args:
    path: destination file.
    flat: name -> array (numpy or JAX; any layout, written C-contiguous).
    metadata: optional string -> string header entries.

  Raises:
    CheckpointError: naming the file, when safetensors rejects a tensor.
  """
  path = os.fspath(path)
  tensors = {key: np.ascontiguousarray(value) for key, value in flat.items()}
  metadata = None if metadata is None else dict(metadata)
  with atomic_path(path) as temporary:
    try:
      safetensors.numpy.save_file(tensors, temporary, metadata=metadata)
    except safetensors.SafetensorError as e:
      raise CheckpointError(
        f'{path}: cannot write it ({e}); pass numeric arrays only.'
      ) from e
