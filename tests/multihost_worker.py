"""One process of the 2-process training run of `test_multihost.py`.

  python -m tests.multihost_worker WORKDIR TOTAL_STEPS RECORD.json [JSON]

Started by the test once per process, with `JAX_COORDINATOR_ADDRESS`,
`JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` and 4 CPU devices in the environment,
it joins the others through `vit_jax.main.initialize_distributed` (the path
of `--config.distributed=True`), runs the real training job
`train.train_and_evaluate` in the shared WORKDIR, and writes to RECORD.json
what the job did on this process: the host shards its input pipelines were
built for, the step it resumed from, its results, and every file it wrote in
WORKDIR outside the checkpoints (seen by a Python audit hook). JSON, if
given, is an object of config overrides on top of `job_config`'s (e.g.
'{"optimizer": "adamw"}'): another multi-host case is another set of
overrides, not another worker.
"""

import functools
import json
import os
import sys

from absl import logging
import jax

from tests import helpers
from vit_jax import input_pipeline
from vit_jax import main as main_lib
from vit_jax import train
from vit_jax.checkpoint import train_state

# Global batch 16 over 8 devices, evaluated and checkpointed at the end only.
# SGD: Adam's division by sqrt(v) would magnify the rounding differences of
# a cross-process mean into visible ones wherever a gradient is ~0 (see
# test_train.test_eight_devices_equal_one). A constant learning rate: the
# schedule does not depend on total_steps, so a 2-step run resumed to 4
# steps makes the updates of one 4-step run.
_OVERRIDES = {
  'batch': 16,
  'batch_eval': 64,
  'optimizer': 'sgd',
  'base_lr': 0.05,
  'decay_type': 'constant',
  'warmup_steps': 0,
  'eval_every': 1000,
  'checkpoint_every': 1000,
  'progress_every': 1000,
  'prefetch': 1,
}


# The overrides of the mesh engine's case: FSDP, with the micro model's
# matrices sharded.
MESH = {'engine': 'mesh', 'fsdp': True, 'fsdp_min_size': 64}


def job_config(total_steps: int, **overrides):
  """The config every process (and the test's reference) trains."""
  return helpers.job_config(
    total_steps=total_steps, **{**_OVERRIDES, **overrides}
  )


class WriteAudit:
  """Records the files opened for writing, renamed or removed under a
  directory, except its checkpoints (written by Orbax on every process).

  A `sys.addaudithook` hook, so it sees every write made from Python
  (`open`, `os.open`, `os.replace`, ...); files written by C++ code (e.g.
  TensorFlow's event writer) are checked by the test instead.
  """

  _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

  def __init__(self, directory: str, excluded: str):
    self._directory = os.path.realpath(directory) + os.sep
    self._excluded = os.path.realpath(os.path.join(directory, excluded))
    self.writes = []

  def _inside(self, path) -> bool:
    if not isinstance(path, (str, bytes, os.PathLike)):
      return False  # A file descriptor.
    path = os.path.realpath(os.fsdecode(path))
    return path.startswith(self._directory) and not (path + os.sep).startswith(
      self._excluded + os.sep
    )

  def __call__(self, event: str, args: tuple) -> None:
    if event == 'open':
      path, mode, flags = args
      writes = any(c in (mode or '') for c in 'wax+') or (
        isinstance(flags, int) and flags & self._WRITE_FLAGS
      )
      paths = [path] if writes else []
    elif event in ('os.rename', 'os.replace'):
      paths = list(args[:2])
    elif event in ('os.remove', 'os.truncate'):
      paths = [args[0]]
    else:
      return
    for path in paths:
      if self._inside(path):
        self.writes.append(
          [event, os.path.relpath(os.fsdecode(path), self._directory)]
        )


def _recording(function, calls: list):
  """`function`, appending the `hosts` and `start_step` of each call."""

  @functools.wraps(function)
  def wrapper(*args, **kwargs):
    hosts = kwargs['hosts']
    calls.append(
      {
        'process_index': hosts.process_index,
        'process_count': hosts.process_count,
        'local_devices': hosts.local_devices,
        'start_step': kwargs.get('start_step', 0),
      }
    )
    return function(*args, **kwargs)

  return wrapper


def main(
  workdir: str, total_steps: int, record_path: str, overrides: dict
) -> None:
  logging.set_verbosity(logging.INFO)  # Into the log the test shows on failure.
  # CPU collectives across processes (JAX 0.10's default, said explicitly).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  main_lib.initialize_distributed()

  audit = WriteAudit(workdir, train_state.CHECKPOINT_SUBDIR)
  sys.addaudithook(audit)
  pipelines = {'train': [], 'eval': []}
  input_pipeline.train_dataset = _recording(
    input_pipeline.train_dataset, pipelines['train']
  )
  input_pipeline.eval_dataset = _recording(
    input_pipeline.eval_dataset, pipelines['eval']
  )
  config = job_config(total_steps, **overrides)
  results = train.train_and_evaluate(config, workdir)
  record = {
    'process_index': jax.process_index(),
    'process_count': jax.process_count(),
    'local_devices': jax.local_device_count(),
    'devices': jax.device_count(),
    'os_pid': os.getpid(),
    'pipelines': pipelines,
    'results': {
      k: results[k]
      for k in (
        'test_examples',
        'test_accuracy',
        'test_loss',
        'resumed_from_step',
      )
    },
    'writes': audit.writes,
  }
  with open(record_path, 'w') as f:
    json.dump(record, f, indent=2)
  jax.distributed.shutdown()


if __name__ == '__main__':
  main(
    sys.argv[1],
    int(sys.argv[2]),
    sys.argv[3],
    json.loads(sys.argv[4]) if len(sys.argv) > 4 else {},
  )
