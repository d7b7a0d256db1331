"""Where examples come from: tfds, embedded arrays, or an image folder.

Every source yields one epoch of `{'image': item, 'label': int32}` for a split
string and a host shard, where `item` is whatever is cheapest to shuffle (a
file path, encoded bytes, or a small uint8 image); `decode` turns it into a
uint8 [H, W, C] image afterwards. Preprocessing and batching are the
pipeline's job (`pipeline.py`), the same for all sources.
"""

import abc
import dataclasses
from typing import Callable, Mapping, Optional, Tuple

import numpy as np
import tensorflow as tf

from vit_jax.input_pipeline import splits as splits_lib


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer needs to know about a dataset."""

  name: str
  class_names: Tuple[str, ...]
  split_sizes: Mapping[str, int]  # Whole splits, before slicing/sharding.

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


class Source(abc.ABC):
  """A dataset of labelled images, readable by split and host shard."""

  info: DatasetInfo

  @abc.abstractmethod
  def num_examples(
    self, split: str, process_index: int = 0, process_count: int = 1
  ) -> int:
    """Examples of `split` in host `process_index`'s shard."""

  @abc.abstractmethod
  def examples(
    self,
    split: str,
    process_index: int = 0,
    process_count: int = 1,
    shuffle_seed: Optional[int] = None,
  ) -> tf.data.Dataset:
    """One epoch of the shard; in a seeded random order when `shuffle_seed`."""

  @abc.abstractmethod
  def decode(self, item: tf.Tensor) -> tf.Tensor:
    """An example's `image` item as a uint8 [H, W, C] image."""


class InMemorySource(Source):
  """Examples held as one array: images (embedded) or file paths (folder).

  Splits are consecutive ranges of the array, in `info.split_sizes` order.
  `decode` turns one item into a uint8 image tensor (the identity for
  images, read-and-decode for paths).
  """

  def __init__(
    self,
    info: DatasetInfo,
    items: np.ndarray,
    labels: np.ndarray,
    decode: Callable[[tf.Tensor], tf.Tensor] = tf.identity,
  ):
    if len(items) != sum(info.split_sizes.values()) or len(items) != len(
      labels
    ):
      raise ValueError(
        f'{info.name}: {len(items)} items and {len(labels)} labels for '
        f'splits {dict(info.split_sizes)}.'
      )
    self.info = info
    self._items = items
    self._labels = labels.astype(np.int32)
    self._decode = decode

  def _indices(
    self, split: str, process_index: int, process_count: int
  ) -> np.ndarray:
    indices = splits_lib.split_indices(
      split, self.info.split_sizes, self.info.name
    )
    return splits_lib.host_shard(indices, process_index, process_count)

  def num_examples(self, split, process_index=0, process_count=1):
    return len(self._indices(split, process_index, process_count))

  def examples(
    self, split, process_index=0, process_count=1, shuffle_seed=None
  ):
    indices = self._indices(split, process_index, process_count)
    ds = tf.data.Dataset.from_tensor_slices(
      {
        'image': self._items[indices],
        'label': self._labels[indices],
      }
    )
    if shuffle_seed is not None:
      # An exact shuffle of the whole shard, different every epoch.
      ds = ds.shuffle(
        len(indices), seed=shuffle_seed, reshuffle_each_iteration=True
      )
    return ds

  def decode(self, item):
    return self._decode(item)
