"""tf.data pipelines that feed `jax.pmap`: batches laid out per device.

One training batch, from disk to the train step (`vit_jax/train.py` calls
each function here with explicit arguments):

1. Source: `get_source(name)` picks the `Source` (`sources.py`): an embedded
   array (`embedded.py`), an image folder (`folder.py`, every file decoded
   once when listed) or a prepared tfds dataset (`tfds_source.py`).
2. Decode: `train_dataset` reads this host's shard of the `pp.train` split
   (`splits.py`) as cheap items (paths, encoded bytes or small images),
   shuffles them and decodes each with `source.decode`.
3. Augment: `preprocess.train_fn` crops, flips and scales each image to
   [-1, 1] (`preprocess.py`).
4. Batch per device: host batches are reshaped to [devices, batch, ...].
5. `device_prefetch` puts batches on the devices ahead of `train.py`'s
   `train_step` (`vit_jax.steps.make_train_step`), whose loss is
   `vit_jax.losses.classifier_loss`.

Training batches are `{'image': [D, B, crop, crop, 3] float32, 'label': [D, B]
int32}` with D the host's local devices and B = global batch / (hosts * D);
the stream is infinite, shuffled, and reproducible for a given seed.

Evaluation batches add `'mask': [D, B] bool`. The last batch is padded with
masked zero images instead of being dropped (vit_jax drops it and scores
CIFAR-10 on 9,728 of its 10,000 test images), and every host runs the same
number of batches, so summing `mask`-weighted results over all hosts scores
each test example exactly once.
"""

import dataclasses
import math
from typing import Any, Dict, Iterator, Optional, Tuple

import flax.jax_utils
import jax
import ml_collections
import numpy as np
import tensorflow as tf

from vit_jax import paths
from vit_jax.errors import ConfigError
from vit_jax.errors import DatasetError
from vit_jax.input_pipeline import embedded
from vit_jax.input_pipeline import folder
from vit_jax.input_pipeline import preprocess
from vit_jax.input_pipeline import sources
from vit_jax.input_pipeline import tfds_source


@dataclasses.dataclass(frozen=True)
class Hosts:
  """Which host this is, of how many, and how many devices it feeds."""

  process_index: int = 0
  process_count: int = 1
  local_devices: int = 1

  @classmethod
  def from_jax(cls) -> 'Hosts':
    return cls(
      jax.process_index(), jax.process_count(), jax.local_device_count()
    )

  def per_device_batch(self, global_batch: int, knob: str = 'batch') -> int:
    """`global_batch` / all devices; ConfigError, naming `config.{knob}`, if
    it does not divide."""
    devices = self.process_count * self.local_devices
    if global_batch <= 0 or global_batch % devices:
      raise ConfigError(
        f'config.{knob}={global_batch} must be a positive multiple of the '
        f'{devices} devices ({self.process_count} host(s) x '
        f'{self.local_devices} local device(s)).'
      )
    return global_batch // devices


@dataclasses.dataclass(frozen=True)
class EvalData:
  """A finite evaluation dataset and how much of the split it covers."""

  dataset: tf.data.Dataset
  num_batches: int  # The same on every host.
  num_examples: int  # Real (unmasked) examples on this host.


def get_source(
  name: str,
  *,
  tfds_data_dir: Optional[str] = None,
  tfds_manual_dir: Optional[str] = None,
  tfds_download: bool = False,
) -> sources.Source:
  """The dataset `name`: embedded, an image folder, or tfds.

  Args:
    name: 'digits' or 'mnist5k' (embedded), an existing directory
      (`folder.py`), or else a tfds dataset name.
    tfds_data_dir: where tfds datasets are prepared (tfds' default if None).
    tfds_manual_dir: where datasets downloaded by hand are found.
    tfds_download: whether to download and prepare a missing tfds dataset.
  """
  if not name:
    raise DatasetError(
      'config.dataset is empty; name a tfds dataset, an '
      "embedded one ('digits', 'mnist5k') or a directory."
    )
  if name in embedded.EMBEDDED:
    return embedded.EMBEDDED[name]()
  if paths.is_dir(name):
    return folder.load_folder(name)
  return tfds_source.TfdsSource(
    name, tfds_data_dir, tfds_manual_dir, tfds_download
  )


def class_names(
  name: str, *, tfds_data_dir: Optional[str] = None
) -> Optional[Tuple[str, ...]]:
  """The class names of dataset `name` without reading its images (tfds
  names come with the dataset's code); None where they are unknown."""
  if not name:
    return None
  if name in embedded.EMBEDDED:
    return embedded.EMBEDDED[name]().info.class_names
  if paths.is_dir(name):
    return tuple(folder.class_names(name))
  return tfds_source.label_names(name, tfds_data_dir)


def _host_seed(seed: int, process_index: int) -> int:
  """A seed per host, so hosts draw different augmentations."""
  return int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])


def _decoded(
  source: sources.Source, example: Dict[str, tf.Tensor]
) -> Dict[str, tf.Tensor]:
  return {**example, 'image': source.decode(example['image'])}


def _split_devices(local_devices: int):
  """Reshapes a host batch [D * B, ...] to [D, B, ...]."""

  def split(batch: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
    return {
      k: tf.reshape(v, [local_devices, -1, *v.shape[1:]])
      for k, v in batch.items()
    }

  return split


def train_dataset(
  source: sources.Source,
  pp: ml_collections.ConfigDict,
  *,
  batch_size: int,
  seed: int,
  shuffle_buffer: int,
  hosts: Optional[Hosts] = None,
  start_step: int = 0,
) -> tf.data.Dataset:
  """The endless, shuffled, augmented training stream of this host.

  Args:
    source: where the examples come from (`get_source`).
    pp: the preprocessing settings (`config.pp`): the split `pp.train`,
      `crop`, `augment`, `pad`, `flip`; the keys it lacks are
      `preprocess.PP_DEFAULTS`' (vit_jax's).
    batch_size: the global batch, over all hosts and devices.
    seed: of the shuffle and the augmentation (per host).
    shuffle_buffer: examples in tf.data's shuffle buffer.
    hosts: this host and its devices; `Hosts.from_jax()` if None.
    start_step: resumes the stream where a run stopped: the batches are the
      ones an uninterrupted run would see from that step on. The skipped
      examples are shuffled but neither decoded nor augmented.
  """
  hosts = hosts or Hosts.from_jax()
  host_batch = hosts.per_device_batch(batch_size) * hosts.local_devices
  pp = preprocess.complete_pp(pp)
  split = pp.train
  size = source.num_examples(split, hosts.process_index, hosts.process_count)
  if size == 0:
    raise DatasetError(
      f'Dataset {source.info.name!r}: training split '
      f'{split!r} is empty on host {hosts.process_index}.'
    )
  seed = _host_seed(seed, hosts.process_index)
  ds = source.examples(
    split, hosts.process_index, hosts.process_count, shuffle_seed=seed
  )
  ds = ds.repeat().shuffle(shuffle_buffer, seed=seed).enumerate()
  ds = ds.skip(start_step * host_batch)
  augment = preprocess.train_fn(pp, seed)
  ds = ds.map(
    lambda i, ex: augment(i, _decoded(source, ex)),
    num_parallel_calls=tf.data.AUTOTUNE,
  )
  ds = ds.batch(host_batch, drop_remainder=True)
  ds = ds.map(_split_devices(hosts.local_devices))
  return ds.prefetch(tf.data.AUTOTUNE)


def feature_dataset(
  features: np.ndarray,
  labels: np.ndarray,
  *,
  batch_size: int,
  seed: int,
  hosts: Optional[Hosts] = None,
  start_step: int = 0,
) -> tf.data.Dataset:
  """The endless, shuffled stream of this host's cached `features` (one
  row per example of its shard of the training split) in batches of
  `batch_size` over all hosts and devices, under the key 'image' that the
  train step reads. The stream visits every row once per epoch, in a new
  order drawn from `seed`; `start_step` resumes as `train_dataset` does."""
  hosts = hosts or Hosts.from_jax()
  host_batch = hosts.per_device_batch(batch_size) * hosts.local_devices
  if len(features) < host_batch:
    raise DatasetError(
      f'{len(features)} cached training examples on host '
      f'{hosts.process_index}, fewer than its batch of {host_batch}.'
    )
  ds = tf.data.Dataset.from_tensor_slices(
    {'image': features.astype(np.float32), 'label': labels.astype(np.int32)}
  )
  ds = ds.shuffle(
    len(features),
    seed=_host_seed(seed, hosts.process_index),
    reshuffle_each_iteration=True,
  )
  ds = ds.repeat().batch(host_batch, drop_remainder=True).skip(start_step)
  return ds.map(_split_devices(hosts.local_devices)).prefetch(tf.data.AUTOTUNE)


def _padding(crop: int) -> tf.data.Dataset:
  return tf.data.Dataset.from_tensors(
    {
      'image': tf.zeros([crop, crop, 3], tf.float32),
      'label': tf.constant(0, tf.int32),
      'mask': tf.constant(False),
    }
  ).repeat()


def eval_dataset(
  source: sources.Source,
  pp: ml_collections.ConfigDict,
  *,
  batch_size: int,
  hosts: Optional[Hosts] = None,
  split: Optional[str] = None,
) -> EvalData:
  """Every example of `split` (default `pp.test`, else 'test') once,
  resized to `pp.crop`, in padded, masked batches of `batch_size` over all
  hosts and devices."""
  hosts = hosts or Hosts.from_jax()
  host_batch = (
    hosts.per_device_batch(batch_size, 'batch_eval') * hosts.local_devices
  )
  pp = preprocess.complete_pp(pp)
  split = split or pp.test
  sizes = [
    source.num_examples(split, index, hosts.process_count)
    for index in range(hosts.process_count)
  ]
  num_batches = math.ceil(max(sizes) / host_batch)
  ds = source.examples(split, hosts.process_index, hosts.process_count)
  resize = preprocess.eval_fn(pp.crop)
  ds = ds.map(
    lambda ex: {**resize(_decoded(source, ex)), 'mask': tf.constant(True)},
    num_parallel_calls=tf.data.AUTOTUNE,
  )
  ds = ds.concatenate(_padding(pp.crop))
  ds = ds.batch(host_batch, drop_remainder=True).take(num_batches)
  ds = ds.map(_split_devices(hosts.local_devices))
  return EvalData(
    ds.prefetch(tf.data.AUTOTUNE), num_batches, sizes[hosts.process_index]
  )


def get_datasets(
  config: ml_collections.ConfigDict,
) -> Tuple[tf.data.Dataset, tf.data.Dataset]:
  """vit_jax's entry point: `(ds_train, ds_test)` of `config.dataset`, as
  the training job builds them (`train_dataset`, `eval_dataset`).

  Unlike vit_jax's, labels are class indices, not one-hot, and the test
  batches cover every example once, padded, with a `mask`.
  """
  source = get_source(
    config.dataset,
    tfds_data_dir=config.get('tfds_data_dir'),
    tfds_manual_dir=config.get('tfds_manual_dir'),
    tfds_download=config.get('tfds_download', True),
  )
  ds_train = train_dataset(
    source,
    config.pp,
    batch_size=config.batch,
    seed=config.seed,
    shuffle_buffer=config.shuffle_buffer,
  )
  ds_test = eval_dataset(source, config.pp, batch_size=config.batch_eval)
  return ds_train, ds_test.dataset


def device_prefetch(
  dataset: tf.data.Dataset, size: int
) -> Iterator[Dict[str, Any]]:
  """Iterates `dataset` with `size` batches already sharded on the devices.

  Each leaf's leading axis is split over `jax.local_devices()`, the layout
  `jax.pmap` expects, so the step starts without a host-to-device copy.
  With `size=0` the NumPy batches are passed through unchanged.
  """
  iterator = dataset.as_numpy_iterator()
  if size <= 0:
    return iterator
  return flax.jax_utils.prefetch_to_device(iterator, size)
