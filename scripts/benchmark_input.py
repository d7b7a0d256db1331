"""Input-pipeline throughput against the train step it feeds, in one run.

For each row (dataset, crop, model) this measures, on this machine:

* pipeline: images/s of the training input pipeline alone (tf.data to NumPy,
  decode + augmentation + batching, after warm-up);
* step: images/s of the trainer's own train step (`vit_jax.steps`:
  forward, backward, clipping, SGD with momentum, as `configs/common.py`
  sets them) of the model on one fixed batch;
* fed: images/s of the same step fed by the pipeline through
  `device_prefetch`, both sharing the machine's cores as in training.

The pipeline keeps up when pipeline / step > 1 and fed / step is close to 1.
CIFAR-10 rows read tfds-format records of random 32x32 PNG images
(`tfds.testing.mock_data` with CIFAR-10's real features), so decoding costs
what it would with the real files.

  python scripts/benchmark_input.py [--batch 32] [--steps 5]
"""

import argparse
import os
import statistics
import tempfile
import time
from typing import Callable, Dict, Iterator

import jax
import tensorflow_datasets as tfds

from configs import common
from vit_jax import input_pipeline
from vit_jax import models
from vit_jax.benchmarks import timing

CIFAR10_TRAIN = 50_000  # The split size the mocked dataset reports.


ROWS = (  # dataset, crop, model
  ('cifar10', 224, 'ViT-Ti_16'),
  ('cifar10', 384, 'ViT-Ti_16'),
  ('digits', 32, 'ViT-Mini_4'),
  ('mnist5k', 28, 'ViT-Mini_7'),
)


def images_per_second(
  run_one: Callable[[], None],
  batch: int,
  count: int,
  warmup: int = 1,
  min_seconds: float = 3.0,
) -> float:
  """Images per second of `run_one` (one batch each call).

  After `warmup` calls (compilation, tf.data buffers filling), times at
  least `count` calls and at least `min_seconds`.
  """
  for _ in range(warmup):
    run_one()
  calls, start = 0, time.perf_counter()
  while calls < count or time.perf_counter() - start < min_seconds:
    run_one()
    calls += 1
  return batch * calls / (time.perf_counter() - start)


def mock_cifar10(data_dir: str):
  """tfds serves 1,000 random CIFAR-10 examples (real features) as a
  prepared dataset in `data_dir` with CIFAR-10's train split size."""
  builder = tfds.builder('cifar10', data_dir=data_dir)
  builder.info.set_splits(
    tfds.core.SplitDict(
      [
        tfds.core.SplitInfo(
          name='train', shard_lengths=[CIFAR10_TRAIN], num_bytes=0
        )
      ]
    )
  )
  os.makedirs(builder.data_dir, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)
  return tfds.testing.mock_data(
    num_examples=1_000,
    data_dir=data_dir,
    policy=tfds.testing.MockPolicy.USE_FILES,
  )


def measure_row(
  dataset: str,
  crop: int,
  model_name: str,
  batch: int,
  count: int,
  data_dir: str,
) -> Dict[str, float]:
  config = common.with_dataset(common.get_config(), dataset)
  config.update({'batch': batch, 'accum_steps': 1})
  config.pp.crop = crop
  config.model = models.MODEL_CONFIGS[model_name]
  source = input_pipeline.get_source(dataset, tfds_data_dir=data_dir)
  device = jax.local_devices()[:1]

  def train_data():
    return input_pipeline.train_dataset(
      source,
      config.pp,
      batch_size=batch,
      seed=config.seed,
      shuffle_buffer=config.shuffle_buffer,
      hosts=input_pipeline.Hosts(0, 1, 1),
    )

  batches = train_data().as_numpy_iterator()
  pipeline = statistics.median(
    images_per_second(lambda: next(batches), batch, 10 * count, warmup=3)
    for _ in range(3)
  )

  step, state, _ = timing.train_step_and_state(
    config, source.info.num_classes, device
  )
  fixed = next(batches)
  holder = {'state': state}

  def run_step(images_and_labels):
    holder['state'], _ = step(holder['state'], images_and_labels)
    jax.block_until_ready(holder['state'])

  # Two warm-up calls: with one, the first timed window measured 2.9 img/s
  # against 4.8 fed (ViT-Ti/16, 224), i.e. a one-off cost remained in it.
  fixed_rate = images_per_second(
    lambda: run_step(fixed), batch, count, warmup=2
  )
  fed_batches: Iterator = input_pipeline.device_prefetch(train_data(), 2)
  # Warm-up fills the shuffle buffer and lets tf.data's autotuning settle.
  fed_rate = images_per_second(
    lambda: run_step(next(fed_batches)), batch, count, warmup=count
  )
  return {'pipeline': pipeline, 'step': fixed_rate, 'fed': fed_rate}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument(
    '--steps', type=int, default=5, help='timed train steps per measurement'
  )
  args = parser.parse_args()
  print(
    f'JAX {jax.__version__} on {jax.devices()[0].device_kind}, '
    f'batch {args.batch}'
  )
  header = (
    f'{"dataset":10} {"crop":>4} {"model":11} {"pipeline img/s":>14} '
    f'{"step img/s":>10} {"fed img/s":>9} {"pipeline/step":>13} '
    f'{"fed/step":>8}'
  )
  print(header)
  with tempfile.TemporaryDirectory() as data_dir, mock_cifar10(data_dir):
    for dataset, crop, model_name in ROWS:
      r = measure_row(
        dataset, crop, model_name, args.batch, args.steps, data_dir
      )
      print(
        f'{dataset:10} {crop:4d} {model_name:11} {r["pipeline"]:14.0f} '
        f'{r["step"]:10.1f} {r["fed"]:9.1f} '
        f'{r["pipeline"] / r["step"]:13.1f} {r["fed"] / r["step"]:8.2f}',
        flush=True,
      )


if __name__ == '__main__':
  main()
