"""Train or time a model: `python -m vit_jax.main --config=FILE.py:ARGS --workdir=DIR`.

  python -m vit_jax.main --config=configs/scratch.py:mnist5k --workdir=/tmp/mnist5k
  python -m vit_jax.main --config=configs/vit.py:b16,cifar10 --workdir=/tmp/b16 \\
      --config.pretrained_dir=DIR --config.total_steps=2000

`--config.KEY=VALUE` overrides any knob of the (locked) config; see
`configs/common.py` for their meaning. `config.trainer` selects the job.
A mistake in the command or config exits with one line (`--verbose`: with
its traceback; see `vit_jax.cli`).
"""

import os
import shlex
import sys
from typing import Mapping, Optional

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from vit_jax import cli
from vit_jax import cpu_devices
from vit_jax import paths
from vit_jax.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file(
  'config',
  None,
  'Experiment config: FILE.py or FILE.py:ARGS.',
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
  'workdir',
  None,
  'Directory for checkpoints, metrics and results; a run '
  'restarted with the same workdir resumes.',
)

TRAINERS = ('train', 'inference_time')

# Where `config.distributed` finds the cluster outside TPU VMs, SLURM and
# Open MPI (which JAX detects itself). JAX reads the address variable itself.
COORDINATOR_ADDRESS_ENV = 'JAX_COORDINATOR_ADDRESS'
NUM_PROCESSES_ENV = 'JAX_NUM_PROCESSES'
PROCESS_ID_ENV = 'JAX_PROCESS_ID'


def _int_from_env(environ: Mapping[str, str], name: str) -> Optional[int]:
  """The integer in `environ[name]`, None if unset; a ConfigError naming
  the variable if it is not an integer."""
  value = environ.get(name)
  if value is None:
    return None
  try:
    return int(value)
  except ValueError:
    raise ConfigError(
      f'{name}={value!r} is not an integer (for config.distributed: '
      f'{NUM_PROCESSES_ENV} is the number of processes, {PROCESS_ID_ENV} '
      "this one's index from 0)."
    ) from None


def initialize_distributed(environ: Mapping[str, str] = os.environ) -> None:
  """Connects this process to the others of a multi-host run.

  On a Cloud TPU VM, under SLURM or Open MPI, JAX finds the coordinator,
  the number of processes and this process's index itself. Elsewhere (e.g.
  two GPU machines) every process is started with the same
  `JAX_COORDINATOR_ADDRESS=HOST:PORT` (process 0's machine, a free port) and
  `JAX_NUM_PROCESSES`, and its own `JAX_PROCESS_ID`; set variables take
  precedence over what JAX detects. Must run before any other JAX call.

  Raises:
    ConfigError: if neither the environment nor a detected cluster says how
      to connect, or the values are inconsistent.
  """
  num_processes = _int_from_env(environ, NUM_PROCESSES_ENV)
  process_id = _int_from_env(environ, PROCESS_ID_ENV)
  try:
    jax.distributed.initialize(
      coordinator_address=environ.get(COORDINATOR_ADDRESS_ENV),
      num_processes=num_processes,
      process_id=process_id,
    )
  except ValueError as e:  # JAX's message for a missing or bad value.
    raise ConfigError(
      'config.distributed=True, but JAX cannot set up the processes: '
      f'{str(e).rstrip(".")}. Outside a TPU VM, SLURM or Open MPI job (which '
      'JAX detects), start every process '
      f"with {COORDINATOR_ADDRESS_ENV}=HOST:PORT (process 0's machine) and "
      f'{NUM_PROCESSES_ENV}=N, and {PROCESS_ID_ENV}=0..N-1 on each; or drop '
      'config.distributed for a single-host run.'
    ) from e


def check_workdir(workdir: str) -> None:
  """Creates `workdir` if needed; a ConfigError naming it if it cannot hold
  the run's files (a file, or not writable). A bucket (`gs://...`) is
  checked by the first write, which names the object."""
  if paths.is_remote(workdir):
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(
      f'--workdir={workdir} is a file; give a directory (it '
      'is created if missing).'
    )
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ConfigError(
      f'--workdir={workdir}: cannot create it ({e.strerror}).'
    ) from e
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise ConfigError(
      f'--workdir={workdir} is not writable; give a directory you can write to.'
    )


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  if config.trainer not in TRAINERS:
    raise ConfigError(
      f'config.trainer={config.trainer!r}; choose one of {TRAINERS}.'
    )
  check_workdir(_WORKDIR.value)
  cpu_devices.configure(config)
  # vit_jax's inference_time config has no `distributed` (one host).
  if config.get('distributed', False):
    initialize_distributed()
  logging.info(
    'JAX process %d of %d, %d local / %d total devices (%s)',
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.devices()[0].device_kind,
  )
  # The trainers import TensorFlow (the input pipeline), seconds of start-up
  # that a mistake in the command line or the config need not wait for.
  if config.trainer == 'train':
    from vit_jax import train

    command = shlex.join(['python', '-m', 'vit_jax.main'] + sys.argv[1:])
    train.train_and_evaluate(config, _WORKDIR.value, command)
  else:
    from vit_jax import inference_time

    inference_time.inference_time(config, _WORKDIR.value)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  cli.run(main)
