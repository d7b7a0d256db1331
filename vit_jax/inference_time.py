"""The `inference_time` job: images/s of a model's forward pass.

  python -m vit_jax.inference_time --config=configs/inference_time.py \\
      --workdir=DIR --config.model_name=ViT-B_16 --config.batch=64 \\
      --config.image_size=224 --config.num_classes=1000
  python -m vit_jax.main --config=configs/vit.py:b16,cifar10 --workdir=DIR \\
      --config.trainer=inference_time --config.pretrained_dir=

It reads either config (`Settings.from_config`): vit_jax's
(`configs/inference_time.py`: `model_name`, `batch` images at `image_size`,
`num_classes`, `initial_steps` untimed and `steps` timed calls) or an
experiment config run with `config.trainer = 'inference_time'`
(`config.model`, `batch_eval` images at `pp.crop`, a 1000-class head,
`WARMUP_RUNS` and `INFERENCE_RUNS` calls). The forward pass compiles once,
runs data-parallel over all local devices, and is timed call by call
(vit_jax's version times its warm-up loop). The results, with the FLOP/s
achieved, go to `WORKDIR/inference_time.json` and, as TensorBoard scalars
(vit_jax's `imgs_sec_core_*` among them), to the workdir's event file.
`scripts/benchmark.py` times many models, training too, against the
machine's matmul peak.
"""

import dataclasses
import statistics
from typing import Any, Dict, Mapping, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from vit_jax import cli
from vit_jax import cpu_devices
from vit_jax import metrics
from vit_jax import models
from vit_jax import paths
from vit_jax import results as results_lib
from vit_jax.benchmarks import timing
from vit_jax.checkpoint import pretrained
from vit_jax.errors import ConfigError

# Calls of an experiment config's timing (vit_jax's config sets its own).
WARMUP_RUNS = 3
INFERENCE_RUNS = 10
# The head of an experiment config's model (its dataset is not read).
EXPERIMENT_CLASSES = 1000
RESULTS_FILE = 'inference_time.json'
# The results also written as TensorBoard scalars (at step 0).
SCALARS = (
  'median_batch_seconds',
  'img_per_sec',
  'img_per_sec_per_core',
  'achieved_gflops_per_s',
  'imgs_sec_core_min',
  'imgs_sec_core_max',
  'imgs_sec_core_mean',
  'imgs_sec_core_std',
)


@dataclasses.dataclass(frozen=True)
class Settings:
  """What is timed, read once from either config schema.

  Attributes:
    model_config: the model's config (`model_name` and its options).
    num_classes: the size of the model's head.
    batch: images per call, over all local devices.
    image_size: the side of the square images.
    dtype: the model's compute dtype.
    seed: of the initial weights (when no checkpoint is loaded).
    warmup: untimed calls after compilation.
    runs: timed calls.
    pretrained_path: the checkpoint loaded first; None: random weights.
  """

  model_config: Mapping[str, Any]
  num_classes: int
  batch: int
  image_size: int
  dtype: str
  seed: int
  warmup: int
  runs: int
  pretrained_path: Optional[str]

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'Settings':
    """vit_jax's schema if `config` names `model_name`, else an experiment
    config's."""
    if 'model_name' in config:
      return cls._from_vit_jax(config)
    return cls._from_experiment(config)

  @classmethod
  def _from_experiment(cls, config: ml_collections.ConfigDict) -> 'Settings':
    return cls(
      model_config=config.model,
      num_classes=EXPERIMENT_CLASSES,
      batch=config.batch_eval,
      image_size=config.pp.crop,
      dtype=config.dtype,
      seed=config.seed,
      warmup=WARMUP_RUNS,
      runs=INFERENCE_RUNS,
      pretrained_path=results_lib.pretrained_path(config),
    )

  @classmethod
  def _from_vit_jax(cls, config: ml_collections.ConfigDict) -> 'Settings':
    """vit_jax's keys; `pretrained_dir` and `dtype` are optional (vit_jax's
    own config has neither)."""
    for key in ('batch', 'num_classes', 'image_size', 'steps'):
      if config[key] <= 0:
        raise ConfigError(
          f'config.{key}={config[key]}; set --config.{key} to a positive '
          'number.'
        )
    if config.initial_steps < 0:
      raise ConfigError(
        f'config.initial_steps={config.initial_steps}; give 0 or more.'
      )
    if config.model_name not in models.MODEL_CONFIGS:
      raise ConfigError(
        f'config.model_name={config.model_name!r} is not a registered '
        f'model; choose one of {", ".join(sorted(models.MODEL_CONFIGS))}.'
      )
    model_config = models.MODEL_CONFIGS[config.model_name]
    return cls(
      model_config=model_config,
      num_classes=config.num_classes,
      batch=config.batch,
      image_size=config.image_size,
      dtype=config.get('dtype', 'float32'),
      seed=0,
      warmup=config.initial_steps,
      runs=config.steps,
      pretrained_path=results_lib.pretrained_path(
        {'pretrained_dir': config.get('pretrained_dir'), 'model': model_config}
      ),
    )


def _per_core_scalars(
  batch: int, devices: int, seconds: Sequence[float]
) -> Dict[str, float]:
  """vit_jax's TensorBoard scalars: images/s per device over the calls."""
  per_core = batch / devices / np.asarray(seconds)
  return {
    'imgs_sec_core_min': float(per_core.min()),
    'imgs_sec_core_max': float(per_core.max()),
    'imgs_sec_core_mean': float(per_core.mean()),
    'imgs_sec_core_std': float(per_core.std()),
  }


def inference_time(
  config: ml_collections.ConfigDict, workdir: str
) -> Dict[str, Any]:
  """Times the forward pass configured by `config` (either schema, see the
  module doc); writes and returns the results."""
  settings = Settings.from_config(config)
  pretrained.check_exists(settings.pretrained_path)
  devices = jax.local_devices()
  model = models.build_model(
    settings.model_config,
    num_classes=settings.num_classes,
    dtype=jnp.dtype(settings.dtype),
  )
  params = pretrained.init_params(
    model,
    settings.image_size,
    seed=settings.seed,
    pretrained_path=settings.pretrained_path,
    model_config=settings.model_config,
  )
  workload = timing.forward_workload(
    model, params, settings.batch, settings.image_size, devices
  )
  seconds = timing.time_rounds(
    {'forward': workload.run}, settings.runs, settings.warmup
  )['forward']
  median = statistics.median(seconds)
  results = {
    'model': settings.model_config['model_name'],
    'resolution': settings.image_size,
    'batch': settings.batch,
    'num_classes': settings.num_classes,
    'dtype': settings.dtype,
    'devices': len(devices),
    'device_kind': devices[0].device_kind,
    'median_batch_seconds': median,
    'img_per_sec': settings.batch / median,
    'img_per_sec_per_core': settings.batch / median / len(devices),
    'gflops_per_image': workload.flops / workload.images / 1e9,
    'achieved_gflops_per_s': workload.flops / median / 1e9,
    'memory_bytes_per_device': workload.memory_bytes,
    **_per_core_scalars(settings.batch, len(devices), seconds),
  }
  logging.info(
    '%s at %d px, batch %d, %s: %.1f img/s (%.1f img/s/core), %.1f GFLOP/s',
    results['model'],
    settings.image_size,
    settings.batch,
    settings.dtype,
    results['img_per_sec'],
    results['img_per_sec_per_core'],
    results['achieved_gflops_per_s'],
  )
  writer = metrics.MetricWriter(workdir)
  writer.write(0, {key: results[key] for key in SCALARS})
  writer.close()
  if jax.process_index() == 0:
    paths.write_json(paths.join(workdir, RESULTS_FILE), results)
  return results


def _run_as_script() -> None:
  """`python -m vit_jax.inference_time --config=FILE.py[:ARGS] --workdir=DIR`
  (the flags are defined here, so importing this module defines none)."""
  config_flag = config_flags.DEFINE_config_file(
    'config', None, 'Config: FILE.py or FILE.py:ARGS.', lock_config=True
  )
  workdir_flag = flags.DEFINE_string(
    'workdir', None, 'Directory for inference_time.json and TensorBoard.'
  )
  flags.mark_flags_as_required(['config', 'workdir'])

  def main(argv) -> None:
    if len(argv) > 1:
      raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    cpu_devices.configure(config_flag.value)
    inference_time(config_flag.value, workdir_flag.value)

  cli.run(main)


if __name__ == '__main__':
  _run_as_script()
