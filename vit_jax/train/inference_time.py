"""`config.trainer = 'inference_time'`: time the model's forward pass.

vit_jax's version of this job reads a key its config never sets and times
its warm-up loop; this one compiles once, warms up, then reports the median
of `INFERENCE_RUNS` timed batches of `config.batch_eval` images at
`config.pp.crop`, data-parallel over all local devices, and writes
`WORKDIR/inference_time.json`.
"""

import os
import statistics
import time
from typing import Any, Dict

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax import input_pipeline
from vit_jax import models
from vit_jax.checkpoint import files
from vit_jax.train import step as step_lib
from vit_jax.train import trainer

WARMUP_RUNS = 3
INFERENCE_RUNS = 10
RESULTS_FILE = 'inference_time.json'


def inference_time(config: ml_collections.ConfigDict,
                   workdir: str) -> Dict[str, Any]:
  """Images/s of the forward pass (1000 classes; weights don't matter)."""
  devices = jax.local_device_count()
  per_device = input_pipeline.Hosts(0, 1, devices).per_device_batch(
      config.batch_eval, 'batch_eval')
  model = models.build_model(config.model, num_classes=1000,
                             dtype=jnp.dtype(config.dtype))
  params = trainer.init_params(model, config.pp.crop, config)
  forward = step_lib.data_parallel(
      lambda p, x: model.apply({'params': p}, x, train=False))
  images = np.random.default_rng(0).uniform(
      -1, 1, [per_device, config.pp.crop, config.pp.crop, 3]).astype(
          np.float32)
  replicated = step_lib.replicate(params)
  images = step_lib.replicate(images)  # On the devices, as in training.
  for _ in range(WARMUP_RUNS):
    jax.block_until_ready(forward(replicated, images))
  times = []
  for _ in range(INFERENCE_RUNS):
    start = time.perf_counter()
    jax.block_until_ready(forward(replicated, images))
    times.append(time.perf_counter() - start)
  seconds = statistics.median(times)
  results = {
      'model': config.model.model_name, 'resolution': config.pp.crop,
      'batch': config.batch_eval, 'dtype': config.dtype, 'devices': devices,
      'device_kind': jax.devices()[0].device_kind,
      'median_batch_seconds': seconds,
      'img_per_sec': config.batch_eval / seconds,
      'img_per_sec_per_core': config.batch_eval / seconds / devices,
  }
  logging.info('%s at %d px, batch %d, %s: %.1f img/s (%.1f img/s/core)',
               results['model'], config.pp.crop, config.batch_eval,
               config.dtype, results['img_per_sec'],
               results['img_per_sec_per_core'])
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    files.write_json(os.path.join(workdir, RESULTS_FILE), results)
  return results
