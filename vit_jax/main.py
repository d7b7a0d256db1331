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

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from vit_jax import cli
from vit_jax import train
from vit_jax.benchmarks import inference_time
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


def check_workdir(workdir: str) -> None:
  """Creates `workdir` if needed; a ConfigError naming it if it cannot hold
  the run's files (a file, or not writable)."""
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
  if config.distributed:
    jax.distributed.initialize()
  logging.info(
    'JAX process %d of %d, %d local / %d total devices (%s)',
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.devices()[0].device_kind,
  )
  if config.trainer == 'train':
    command = shlex.join(['python', '-m', 'vit_jax.main'] + sys.argv[1:])
    train.train_and_evaluate(config, _WORKDIR.value, command)
  else:
    inference_time.inference_time(config, _WORKDIR.value)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  cli.run(main)
