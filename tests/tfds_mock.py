"""tfds without the data: real metadata, random examples, for the tests.

`tfds.testing.mock_data` serves random examples with a dataset's true
features, but takes split sizes from a `dataset_info.json` on disk. This
writes that file for the split sizes a test wants.
"""

import contextlib
import os
from typing import Iterator, Mapping

import tensorflow_datasets as tfds


def write_metadata(
  data_dir: str, name: str, split_sizes: Mapping[str, int]
) -> None:
  """Writes `name`'s dataset_info.json under `data_dir` with these splits."""
  builder = tfds.builder(name, data_dir=data_dir)
  builder.info.set_splits(
    tfds.core.SplitDict(
      [
        tfds.core.SplitInfo(name=split, shard_lengths=[size], num_bytes=0)
        for split, size in split_sizes.items()
      ]
    )
  )
  os.makedirs(builder.data_dir, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)


@contextlib.contextmanager
def mock_tfds(
  data_dir: str, name: str, split_sizes: Mapping[str, int], num_examples: int
) -> Iterator[None]:
  """tfds serves `num_examples` random examples of `name` for any split.

  Inside, `tfds.builder(name, data_dir=data_dir)` reports `split_sizes`.
  """
  write_metadata(data_dir, name, split_sizes)
  with tfds.testing.mock_data(
    num_examples=num_examples,
    data_dir=data_dir,
    policy=tfds.testing.MockPolicy.USE_FILES,
  ):
    yield
