"""Checkpoint files: `.npz` and `.safetensors` archives, read and written.

Readers return flat `{name: array}` dicts and raise a `CheckpointError`
naming the file, and saying what to do, for a missing, truncated or foreign
file. Paths may be local or `gs://`; every writer serialises the archive in
memory and hands it to `paths.write_bytes`, so a crash (or a full disk)
while writing leaves the previous file intact: a reader sees the old file or
the new one, never half.
"""

import io
import os
from typing import Any, Dict, Mapping, Optional, Union
import zipfile
import zlib

import numpy as np
import safetensors
import safetensors.numpy

from vit_jax import paths
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


def read_npz(path: PathLike) -> Dict[str, np.ndarray]:
  """Every array of the `.npz` at `path`, as stored (no pickles).

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
  with paths.open_file(path) as f:
    try:
      archive = np.load(f, allow_pickle=False)
    except _NPZ_ERRORS as e:  # numpy's text (of pickles, say) would mislead.
      raise CheckpointError(not_readable) from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
      raise CheckpointError(
        f'{path}: holds a single array, not an .npz archive of named arrays.'
      )
    arrays = _read_arrays(path, archive, not_readable)
  if not arrays:
    raise CheckpointError(f'{path}: the archive holds no arrays.')
  return arrays


def _read_arrays(
  path: str, archive: np.lib.npyio.NpzFile, not_readable: str
) -> Dict[str, np.ndarray]:
  """Every array of an open archive; a CheckpointError for a pickle or a
  damaged member."""
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
  return arrays


def _check_is_file(path: str) -> None:
  """A CheckpointError naming `path` if it is missing or a folder."""
  if paths.is_dir(path):
    raise CheckpointError(f'{path}: is a folder, not a checkpoint file.')
  if not paths.exists(path):
    raise CheckpointError(f'{path}: no such file; check the path.')


def as_float32(arrays: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """`arrays` with the floating-point ones (float16, bfloat16, float64) as
  float32, the dtype of Flax parameters; other arrays unchanged."""
  return {
    key: value.astype(np.float32)
    if value.dtype.kind == 'f' or value.dtype.name == 'bfloat16'
    else value
    for key, value in arrays.items()
  }


def write_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
  """`np.savez(path, **arrays)`, atomically."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  paths.write_bytes(path, buffer.getvalue())


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
    # load_file, unlike load(bytes), reads bfloat16 (through ml_dtypes).
    with paths.local_file(path) as local:
      flat = safetensors.numpy.load_file(local)
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
  """Writes `flat` to `path` atomically (see `paths.write_bytes`).

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
  try:
    data = safetensors.numpy.save(tensors, metadata=metadata)
  except safetensors.SafetensorError as e:
    raise CheckpointError(
      f'{path}: cannot write it ({e}); pass numeric arrays only.'
    ) from e
  paths.write_bytes(path, data)
