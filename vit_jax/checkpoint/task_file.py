"""Task files: only the fine-tuned parameters, applied on top of a base model.

Parameter-efficient fine-tuning trains a few leaves (the head, injected
adapters, ...) of a large frozen base. A task file stores just those leaves,
so one base checkpoint serves many small task files:

  save_task_params('cifar10.npz', params, trainable=fine.is_trainable)
  params = load_task_params('cifar10.npz', base_params)

The file is an `.npz` readable with `np.load(path, allow_pickle=False)`: one
array per selected leaf, keyed by its '/'-joined path, plus a JSON description
under `META_KEY` (a uint8 array) that records the base it was trained on:
each base path's shape, and a SHA-256 fingerprint of the base's paths, shapes,
dtypes and values. Loading checks the given base against it, so a task file is
never silently applied to a different backbone.

Paths are those of files: a scanned model's stacked encoder blocks are saved
per layer (`layer_stack`), so its task file has the keys and fingerprint of
the unscanned model's, and loading returns the layout of the base given.

In multi-host training, save from one process (`jax.process_index() == 0`):
the parameters saved are replicated, and one writer is enough.
"""

import hashlib
import json
from typing import Any, Dict, Mapping, Optional, Tuple

import jax.numpy as jnp
import numpy as np

from vit_jax import trainable as trainable_lib
from vit_jax.checkpoint import files
from vit_jax.checkpoint import inspect
from vit_jax.checkpoint import layer_stack
from vit_jax.errors import CheckpointError

PyTree = Any

META_PREFIX = '__meta__/'
META_KEY = META_PREFIX + 'json'
FORMAT = 'vit_jax task params'
VERSION = 1
# Hex digits of a fingerprint shown in error messages.
_SHORT = 12


def _flat_numpy(tree: PyTree) -> Dict[str, np.ndarray]:
  """{'a/b': leaf} of a nested dict as files hold it (per-layer blocks),
  with leaves as host numpy arrays."""
  return {
    path: np.asarray(x)
    for path, x in inspect.flatten(layer_stack.to_file_layout(tree)).items()
  }


def fingerprint(flat: Mapping[str, np.ndarray]) -> str:
  """SHA-256 (hex) of the sorted paths, shapes, dtypes and raw values.

  Each leaf contributes a JSON header (path, shape, dtype) and its C-order
  bytes, prefixed by their length, so no two different trees share a stream.
  """
  sha = hashlib.sha256()
  for path in sorted(flat):
    value = np.ascontiguousarray(flat[path])
    header = json.dumps([path, value.shape, value.dtype.name])
    data = value.tobytes()
    sha.update(header.encode() + b'\0' + len(data).to_bytes(8, 'little'))
    sha.update(data)
  return sha.hexdigest()


def save_task_params(
  path: str,
  params: PyTree,
  trainable: trainable_lib.Trainable,
  base_params: Optional[PyTree] = None,
  metadata: Optional[Mapping[str, Any]] = None,
) -> None:
  """Writes the `trainable` leaves of `params` and a record of their base.

  Args:
    path: the `.npz` file to write (replaced atomically if it exists).
    params: the fine-tuned parameter tree (nested dicts of arrays).
    trainable: the run's predicate on '/'-joined paths (see
      `vit_jax.trainable`), true for the leaves that were trained. It is
      asked about the paths of `params`' own layout: for stacked blocks, a
      layer's leaves are saved when their stacked path is trainable.
    base_params: the base the fine-tuning started from. Default: the leaves
      of `params` that are not trainable, which were frozen so still equal
      the base. If given, those frozen leaves must equal it.
    metadata: JSON-serialisable description of the task (e.g. the model and
      fine-tuning config, class names), returned by `read_record`.

  Raises:
    CheckpointError: if nothing is selected, a path uses the reserved
      `META_PREFIX`, or a frozen leaf differs from `base_params`.
  """
  flat = _flat_numpy(params)
  # `trainable` knows the paths the run trained, stacked for a scanned model.
  trained_path = (
    layer_stack.stacked_path if layer_stack.is_stacked(params) else str
  )
  task = {p: v for p, v in flat.items() if trainable(trained_path(p))}
  if not task:
    raise CheckpointError(
      f'{path}: `trainable` selects none of the parameters (e.g. '
      f'{sorted(flat)[:5]}); nothing was trained.'
    )
  reserved = sorted(p for p in flat if p.startswith(META_PREFIX))
  if reserved:
    raise CheckpointError(
      f'{path}: parameter paths {reserved} start with the reserved prefix '
      f'{META_PREFIX!r}; rename those modules.'
    )
  frozen = {p: v for p, v in flat.items() if p not in task}
  if base_params is None:
    base = frozen
  else:
    base = {p: v for p, v in _flat_numpy(base_params).items() if p not in task}
    changed = sorted(
      p
      for p, v in frozen.items()
      if p not in base or not np.array_equal(v, base[p])
    )
    if changed:
      raise CheckpointError(
        f'{path}: these parameters are not selected as trainable but differ '
        f'from base_params, so the task file would lose them: {changed}. '
        f'Add them to `trainable`, or pass the base they were trained on.'
      )
  meta = {
    'format': FORMAT,
    'version': VERSION,
    'task_dtypes': {p: v.dtype.name for p, v in task.items()},
    'base_shapes': {p: list(v.shape) for p, v in base.items()},
    'base_fingerprint': fingerprint(base),
    'metadata': dict(metadata or {}),
  }
  meta_bytes = np.frombuffer(json.dumps(meta).encode(), np.uint8)
  files.write_npz(path, {**task, META_KEY: meta_bytes})


def _parse_meta(path: str, arrays: Mapping[str, np.ndarray]) -> dict:
  """The JSON description stored under META_KEY, checked for format/version."""
  if META_KEY not in arrays:
    raise CheckpointError(
      f'{path}: not a task file, it has no {META_KEY!r} entry (keys: '
      f'{sorted(arrays)[:5]}...). Full checkpoints load with '
      f'vit_jax.checkpoint.load; task files are written by save_task_params.'
    )
  try:
    meta = json.loads(arrays[META_KEY].tobytes().decode())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(
      f'{path}: the {META_KEY!r} entry is not valid JSON ({e}); the file is '
      f'corrupt, save it again.'
    ) from e
  if not isinstance(meta, dict) or meta.get('format') != FORMAT:
    raise CheckpointError(
      f'{path}: {META_KEY!r} does not describe a task file (expected format '
      f'{FORMAT!r}).'
    )
  if meta.get('version') != VERSION:
    raise CheckpointError(
      f'{path}: task file version {meta.get("version")!r}, this code reads '
      f'version {VERSION}; update vit_jax.'
    )
  return meta


def read_record(path: str) -> Dict[str, Any]:
  """A task file's record: `metadata` (what it was saved with), and its
  base's `base_shapes` (empty when the file holds every parameter) and
  `base_fingerprint`."""
  return _parse_meta(path, files.read_npz(path))


def is_task_file(arrays: Mapping[str, np.ndarray]) -> bool:
  """Whether the arrays of an `.npz` are a task file's (they hold a record),
  so that readers of checkpoints do not take the record for a parameter."""
  return META_KEY in arrays


def holds_every_parameter(record: Mapping[str, Any]) -> bool:
  """Whether the task file of `record` needs no base (e.g. finetune.mode
  'full' trains, so saves, every parameter)."""
  return not record['base_shapes']


def mode(record: Mapping[str, Any]) -> str:
  """The `config.finetune.mode` the task file was trained in, as its record
  says ('not recorded' for files saved without the trainer's metadata)."""
  finetune = record['metadata'].get('finetune') or {}
  return finetune.get('mode') or 'not recorded'


def parse(
  path: str, arrays: Mapping[str, np.ndarray]
) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
  """A task file's record (see `read_record`) and parameters ({'/'-joined
  path: array}, in the dtypes they were saved in), from the arrays of the
  `.npz` at `path` as stored."""
  meta = _parse_meta(path, arrays)
  task = {
    p: v.view(jnp.dtype(meta['task_dtypes'][p]))
    for p, v in arrays.items()
    if not p.startswith(META_PREFIX)
  }
  return meta, task


def load_task_params(
  path: str, base_params: PyTree, strict: bool = True
) -> PyTree:
  """Applies the task file at `path` on top of `base_params`.

  Args:
    path: a file written by `save_task_params`.
    base_params: the base parameter tree the task was fine-tuned from. Its
      leaves that the task file replaces (e.g. a head with another number of
      classes) are not compared.
    strict: if True, the base's values must be those the task was trained on
      (same fingerprint); if False only its paths and shapes are checked, e.g.
      to try a task on a base in another dtype or a re-export.

  Returns:
    `base_params` (a new nested dict, in its layout: stacked blocks for a
    scanned model) with the task's leaves inserted: they replace base
    leaves or add new paths (e.g. adapters). Task leaves are numpy arrays
    in the dtype they were saved in.

  Raises:
    CheckpointError: naming `path`, if the file is missing, corrupt or not a
      task file, or `base_params` is not the base the task was trained on.
  """
  meta, task = parse(path, files.read_npz(path))
  flat = inspect.flatten(layer_stack.to_file_layout(base_params))
  if not flat and meta['base_shapes']:
    raise CheckpointError(
      f'{path}: holds only the fine-tuned arrays ({len(task)}); the other '
      f'{len(meta["base_shapes"])} come from the checkpoint it was '
      'fine-tuned from (recorded: '
      f'{meta["metadata"].get("pretrained_path") or "not recorded"}). Pass '
      'that base checkpoint.'
    )
  base = {p: v for p, v in flat.items() if p not in task}
  diff = inspect.compare(
    {p: np.shape(v) for p, v in base.items()},
    {p: tuple(s) for p, s in meta['base_shapes'].items()},
  )
  if not diff.ok:
    raise CheckpointError(
      f'{path}: base_params is not the base this task was trained on:\n'
      f'{diff.report(loaded="base_params", expected="recorded base")}\n'
      'Pass the base checkpoint the task was fine-tuned from.'
    )
  if strict:
    expected, actual = meta['base_fingerprint'], fingerprint(base)
    if expected != actual:
      raise CheckpointError(
        f'{path}: the task file was trained on a different base checkpoint '
        f'(fingerprint {expected[:_SHORT]}, base_params has '
        f'{actual[:_SHORT]}): same paths and shapes, other values or '
        f'dtypes. Pass the base it was fine-tuned from, or strict=False to '
        f'apply it anyway.'
      )
  return layer_stack.like(inspect.unflatten({**flat, **task}), base_params)
