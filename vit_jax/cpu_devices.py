"""How many JAX devices a CPU host has: data parallelism over its cores.

XLA's CPU backend gives a host one device, and a compiled step runs some
of a ViT's operations on one thread only (the attention's batched
matmuls, layer norms, the GELU, layout copies). With N devices the
trainer's `pmap` splits every batch N ways and the devices run their
shares at once. docs/benchmarks.md measures where this pays (ViT-Ti/16
inference at 224) and where it does not reliably (training, ViT-B/16, the
28-pixel from-scratch run), which is why one device stays the default.

`configure` sets the count (`config.cpu_devices`) through
`jax_num_cpu_devices` before JAX starts its backends, unless the
environment chose one (`--xla_force_host_platform_device_count` in
`XLA_FLAGS`, or `JAX_NUM_CPU_DEVICES`). Accelerators are unaffected: the
count applies to the CPU backend only.
"""

import os
from typing import Mapping, Optional

from absl import logging
import jax
import ml_collections

from vit_jax.errors import ConfigError

XLA_COUNT_FLAG = '--xla_force_host_platform_device_count'
JAX_COUNT_ENV = 'JAX_NUM_CPU_DEVICES'


def host_cores() -> int:
  """The cores this process may run on (its CPU affinity, else all)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    return os.cpu_count() or 1


def user_chose_count(environ: Mapping[str, str] = os.environ) -> bool:
  """Whether the environment already sets the CPU device count."""
  return XLA_COUNT_FLAG in environ.get('XLA_FLAGS', '') or bool(
    environ.get(JAX_COUNT_ENV)
  )


def count_for_batches(
  cores: int, batch: int, batch_eval: int, accum_steps: int = 1
) -> int:
  """The most devices, at most `cores`, over which the training batch splits
  into `accum_steps` micro-batches per device and the evaluation batch
  splits evenly (1 if no larger count does)."""
  for count in range(max(cores, 1), 1, -1):
    if batch % (count * accum_steps) == 0 and batch_eval % count == 0:
      return count
  return 1


def set_count(count: int) -> bool:
  """Makes JAX's CPU backend start with `count` devices; False (and a log
  line) if JAX has already started it with another count."""
  try:
    jax.config.update('jax_num_cpu_devices', count)
  except RuntimeError:
    logging.warning(
      'JAX already started its CPU backend; keeping its device count '
      '(set the count before the first JAX operation).'
    )
    return False
  return True


def configure(
  config: ml_collections.ConfigDict, environ: Mapping[str, str] = os.environ
) -> Optional[int]:
  """Sets the CPU device count of `config`'s run; returns it, or None where
  the environment chose it or JAX had already started.

  `config.cpu_devices`: N > 0 asks for N devices (1, the default, is XLA's
  own); 0 for one per core, or the most up to that over which
  `config.batch` (in `accum_steps` micro-batches) and `config.batch_eval`
  split.
  """
  asked = config.get('cpu_devices', 1)
  if asked < 0:
    raise ConfigError(
      f'config.cpu_devices={asked}; give a device count, or 0 for one '
      'device per core.'
    )
  if user_chose_count(environ):
    return None
  count = asked or count_for_batches(
    host_cores(), config.batch, config.batch_eval, config.accum_steps
  )
  return count if set_count(count) else None
