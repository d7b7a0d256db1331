"""tf.data pipelines that feed `jax.pmap`: batches laid out per device.

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
import os
from typing import Any, Dict, Iterator, Optional, Tuple

import flax.jax_utils
import jax
import ml_collections
import numpy as np
import tensorflow as tf

from vit_jax.input_pipeline import embedded
from vit_jax.input_pipeline import folder
from vit_jax.input_pipeline import preprocess
from vit_jax.input_pipeline import sources
from vit_jax.input_pipeline import tfds_source
from vit_jax.errors import DatasetError


@dataclasses.dataclass(frozen=True)
class Hosts:
  """Which host this is, of how many, and how many devices it feeds."""
  process_index: int = 0
  process_count: int = 1
  local_devices: int = 1

  @classmethod
  def from_jax(cls) -> 'Hosts':
    return cls(jax.process_index(), jax.process_count(),
               jax.local_device_count())

  def per_device_batch(self, global_batch: int, knob: str = 'batch') -> int:
    """`global_batch` / all devices; a config error if it does not divide."""
    devices = self.process_count * self.local_devices
    if global_batch <= 0 or global_batch % devices:
      raise ValueError(
          f'config.{knob}={global_batch} must be a positive multiple of the '
          f'{devices} devices ({self.process_count} host(s) x '
          f'{self.local_devices} local device(s)).')
    return global_batch // devices


@dataclasses.dataclass(frozen=True)
class EvalData:
  """A finite evaluation dataset and how much of the split it covers."""
  dataset: tf.data.Dataset
  num_batches: int  # The same on every host.
  num_examples: int  # Real (unmasked) examples on this host.


def get_source(config: ml_collections.ConfigDict) -> sources.Source:
  """The dataset named by `config.dataset`: embedded, a folder, or tfds."""
  name = config.dataset
  if not name:
    raise DatasetError('config.dataset is empty; name a tfds dataset, an '
                       "embedded one ('digits', 'mnist5k') or a directory.")
  if name in embedded.EMBEDDED:
    return embedded.EMBEDDED[name]()
  if os.path.isdir(name):
    return folder.load_folder(name)
  return tfds_source.TfdsSource(name, config.tfds_data_dir,
                                config.tfds_manual_dir, config.tfds_download)


def class_names(config: ml_collections.ConfigDict) -> Optional[Tuple[str, ...]]:
  """The class names of `config.dataset` without preparing or downloading
  it (tfds names come with the dataset's code); None where they are unknown."""
  name = config.dataset
  if not name:
    return None
  if name in embedded.EMBEDDED or os.path.isdir(name):
    return get_source(config).info.class_names
  return tfds_source.label_names(name, config.tfds_data_dir)


def _host_seed(seed: int, process_index: int) -> int:
  """A seed per host, so hosts draw different augmentations."""
  return int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])


def _decoded(source: sources.Source,
             example: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
  return {**example, 'image': source.decode(example['image'])}


def _split_devices(local_devices: int):
  """Reshapes a host batch [D * B, ...] to [D, B, ...]."""

  def split(batch: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
    return {k: tf.reshape(v, [local_devices, -1, *v.shape[1:]])
            for k, v in batch.items()}

  return split


def train_dataset(source: sources.Source, config: ml_collections.ConfigDict,
                  hosts: Optional[Hosts] = None,
                  start_step: int = 0) -> tf.data.Dataset:
  """The endless, shuffled, augmented training stream of this host.

  `start_step` resumes the stream where a run stopped: the batches are the
  ones an uninterrupted run would see from that step on. The skipped
  examples are shuffled but neither decoded nor augmented.
  """
  hosts = hosts or Hosts.from_jax()
  host_batch = hosts.per_device_batch(config.batch) * hosts.local_devices
  split = config.pp.train
  size = source.num_examples(split, hosts.process_index, hosts.process_count)
  if size == 0:
    raise DatasetError(f'Dataset {source.info.name!r}: training split '
                       f'{split!r} is empty on host {hosts.process_index}.')
  seed = _host_seed(config.seed, hosts.process_index)
  ds = source.examples(split, hosts.process_index, hosts.process_count,
                       shuffle_seed=seed)
  ds = ds.repeat().shuffle(config.shuffle_buffer, seed=seed).enumerate()
  ds = ds.skip(start_step * host_batch)
  augment = preprocess.train_fn(config.pp, seed)
  ds = ds.map(lambda i, ex: augment(i, _decoded(source, ex)),
              num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(host_batch, drop_remainder=True)
  ds = ds.map(_split_devices(hosts.local_devices))
  return ds.prefetch(tf.data.AUTOTUNE)


def _padding(crop: int) -> tf.data.Dataset:
  return tf.data.Dataset.from_tensors({
      'image': tf.zeros([crop, crop, 3], tf.float32),
      'label': tf.constant(0, tf.int32),
      'mask': tf.constant(False),
  }).repeat()


def eval_dataset(source: sources.Source, config: ml_collections.ConfigDict,
                 hosts: Optional[Hosts] = None) -> EvalData:
  """Every example of `config.pp.test` once, in padded, masked batches."""
  hosts = hosts or Hosts.from_jax()
  host_batch = (hosts.per_device_batch(config.batch_eval, 'batch_eval') *
                hosts.local_devices)
  split = config.pp.test
  sizes = [source.num_examples(split, index, hosts.process_count)
           for index in range(hosts.process_count)]
  num_batches = math.ceil(max(sizes) / host_batch)
  ds = source.examples(split, hosts.process_index, hosts.process_count)
  resize = preprocess.eval_fn(config.pp)
  ds = ds.map(lambda ex: {**resize(_decoded(source, ex)),
                          'mask': tf.constant(True)},
              num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.concatenate(_padding(config.pp.crop))
  ds = ds.batch(host_batch, drop_remainder=True).take(num_batches)
  ds = ds.map(_split_devices(hosts.local_devices))
  return EvalData(ds.prefetch(tf.data.AUTOTUNE), num_batches,
                  sizes[hosts.process_index])


def device_prefetch(dataset: tf.data.Dataset,
                    size: int) -> Iterator[Dict[str, Any]]:
  """Iterates `dataset` with `size` batches already sharded on the devices.

  Each leaf's leading axis is split over `jax.local_devices()`, the layout
  `jax.pmap` expects, so the step starts without a host-to-device copy.
  With `size=0` the NumPy batches are passed through unchanged.
  """
  iterator = dataset.as_numpy_iterator()
  if size <= 0:
    return iterator
  return flax.jax_utils.prefetch_to_device(iterator, size)
