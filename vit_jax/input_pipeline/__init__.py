"""Input pipeline: tfds, embedded and image-folder datasets fed to pmap.

  source = input_pipeline.get_source(config.dataset, tfds_data_dir=...)
  train = input_pipeline.train_dataset(
      source, config.pp, batch_size=config.batch, seed=config.seed,
      shuffle_buffer=config.shuffle_buffer)
  evaluation = input_pipeline.eval_dataset(source, config.pp,
                                           batch_size=config.batch_eval)
  for batch in input_pipeline.device_prefetch(train, config.prefetch): ...

`pipeline.py` tells how one batch gets from disk to the devices.
TensorFlow runs only the input pipeline, so it is kept off any GPU.
"""

import tensorflow as tf

try:
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # TensorFlow was already initialised by the caller.
  pass

# pylint: disable=g-import-not-at-top,wrong-import-position
from vit_jax.errors import DatasetError
from vit_jax.input_pipeline.folder import read_images
from vit_jax.input_pipeline.pipeline import EvalData
from vit_jax.input_pipeline.pipeline import Hosts
from vit_jax.input_pipeline.pipeline import class_names
from vit_jax.input_pipeline.pipeline import device_prefetch
from vit_jax.input_pipeline.pipeline import eval_dataset
from vit_jax.input_pipeline.pipeline import feature_dataset
from vit_jax.input_pipeline.pipeline import get_datasets
from vit_jax.input_pipeline.pipeline import get_source
from vit_jax.input_pipeline.pipeline import train_dataset
from vit_jax.input_pipeline.preprocess import complete_pp
from vit_jax.input_pipeline.sources import DatasetInfo
from vit_jax.input_pipeline.sources import Source

# vit_jax's name of `device_prefetch`.
prefetch = device_prefetch

__all__ = [
  'DatasetError',
  'DatasetInfo',
  'EvalData',
  'Hosts',
  'Source',
  'class_names',
  'complete_pp',
  'device_prefetch',
  'eval_dataset',
  'feature_dataset',
  'get_datasets',
  'get_source',
  'prefetch',
  'read_images',
  'train_dataset',
]
