"""`config.trainer = 'inference_time'`: time the model's forward pass.

vit_jax's version of this job reads a key its config never sets and times
its warm-up loop; this one compiles once, warms up, then reports the median
of `INFERENCE_RUNS` timed batches of `config.batch_eval` images at
`config.pp.crop`, data-parallel over all local devices, with the FLOP/s
achieved, and writes `WORKDIR/inference_time.json`. `scripts/benchmark.py`
times many models, training too, against the machine's matmul peak.
"""

import statistics
from typing import Any, Dict

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from vit_jax import models
from vit_jax import paths
from vit_jax import results as results_lib
from vit_jax.benchmarks import timing
from vit_jax.checkpoint import pretrained

WARMUP_RUNS = 3
INFERENCE_RUNS = 10
RESULTS_FILE = 'inference_time.json'


def inference_time(
  config: ml_collections.ConfigDict, workdir: str
) -> Dict[str, Any]:
  """Images/s of the forward pass (1000 classes; weights don't matter)."""
  devices = jax.local_devices()
  model = models.build_model(
    config.model, num_classes=1000, dtype=jnp.dtype(config.dtype)
  )
  params = pretrained.init_params(
    model,
    config.pp.crop,
    seed=config.seed,
    pretrained_path=results_lib.pretrained_path(config),
    model_config=config.model,
  )
  workload = timing.forward_workload(
    model, params, config.batch_eval, config.pp.crop, devices
  )
  seconds = statistics.median(
    timing.time_rounds({'forward': workload.run}, INFERENCE_RUNS, WARMUP_RUNS)[
      'forward'
    ]
  )
  results = {
    'model': config.model.model_name,
    'resolution': config.pp.crop,
    'batch': config.batch_eval,
    'dtype': config.dtype,
    'devices': len(devices),
    'device_kind': devices[0].device_kind,
    'median_batch_seconds': seconds,
    'img_per_sec': config.batch_eval / seconds,
    'img_per_sec_per_core': config.batch_eval / seconds / len(devices),
    'gflops_per_image': workload.flops / workload.images / 1e9,
    'achieved_gflops_per_s': workload.flops / seconds / 1e9,
    'memory_bytes_per_device': workload.memory_bytes,
  }
  logging.info(
    '%s at %d px, batch %d, %s: %.1f img/s (%.1f img/s/core), %.1f GFLOP/s',
    results['model'],
    config.pp.crop,
    config.batch_eval,
    config.dtype,
    results['img_per_sec'],
    results['img_per_sec_per_core'],
    results['achieved_gflops_per_s'],
  )
  if jax.process_index() == 0:
    paths.write_json(paths.join(workdir, RESULTS_FILE), results)
  return results
