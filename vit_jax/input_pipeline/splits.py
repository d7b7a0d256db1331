"""Split strings (tfds syntax) and per-host shards for in-memory datasets.

Embedded datasets and image folders accept the same split strings as tfds
(`train`, `train[:98%]`, `train[100:200]+test`), parsed by tfds itself so the
meaning is identical. Each host then reads one contiguous shard, sized like
`tfds.even_splits` (shard sizes differ by at most one).
"""

import types
from typing import Mapping

import numpy as np
import tensorflow_datasets as tfds

from vit_jax.errors import DatasetError


def split_indices(
  spec: str, split_sizes: Mapping[str, int], dataset: str
) -> np.ndarray:
  """Positions selected by `spec`, as (split name, index) → flat index.

  Returns indices into the concatenation of the splits in `split_sizes`
  order, so callers can keep one array of examples for all splits.
  """
  try:
    instruction = tfds.core.ReadInstruction.from_spec(spec)
  except (ValueError, AssertionError) as e:
    raise DatasetError(
      f'Dataset {dataset!r}: cannot parse split {spec!r} ({e}). Use tfds '
      "split syntax, e.g. 'train', 'train[:90%]', 'train[100:200]'."
    ) from e
  infos = {
    name: types.SimpleNamespace(num_examples=size)
    for name, size in split_sizes.items()
  }
  try:
    absolute = instruction.to_absolute(infos)
  except (KeyError, ValueError, AssertionError) as e:
    raise DatasetError(
      f'Dataset {dataset!r} has no split matching {spec!r} ({e}); its '
      f'splits are {dict(split_sizes)}.'
    ) from e
  offsets = dict(zip(split_sizes, np.cumsum([0, *split_sizes.values()])))
  pieces = []
  for part in absolute:
    size = split_sizes[part.splitname]
    start, stop, _ = slice(part.from_, part.to).indices(size)
    pieces.append(offsets[part.splitname] + np.arange(start, stop))
  return np.concatenate(pieces) if pieces else np.zeros([0], np.int64)


def host_shard(
  indices: np.ndarray, process_index: int, process_count: int
) -> np.ndarray:
  """The contiguous part of `indices` that host `process_index` reads."""
  if not 0 <= process_index < process_count:
    raise ValueError(
      f'process_index {process_index} is outside [0, {process_count}).'
    )
  return np.array_split(indices, process_count)[process_index]
