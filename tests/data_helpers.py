"""Datasets made by the tests."""

import numpy as np

from vit_jax.input_pipeline import sources


def id_source(
  num_train: int, num_test: int, side: int = 4
) -> sources.InMemorySource:
  """Each example's label is its own position, so batches reveal coverage.

  Images are `side`x`side` grey with every pixel equal to label % 251, so
  pixels and labels can be checked against each other after preprocessing.
  """
  total = num_train + num_test
  labels = np.arange(total)
  images = np.broadcast_to(
    (labels % 251).astype(np.uint8)[:, None, None, None], (total, side, side, 1)
  ).copy()
  info = sources.DatasetInfo(
    'ids', tuple(map(str, range(total))), {'train': num_train, 'test': num_test}
  )
  return sources.InMemorySource(info, images, labels)
