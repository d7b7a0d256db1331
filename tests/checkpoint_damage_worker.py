"""One process of the 2-process damaged-checkpoint case of
`test_checkpoint_damage.py`.

  python -m tests.checkpoint_damage_worker WORKDIR RECORD.json

Started once per process with `JAX_COORDINATOR_ADDRESS`,
`JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` in the environment: every process
saves steps 1, 2, 3 into the shared WORKDIR, process 0 garbles step 3,
every process restores, then saves step 3 again and restores it. RECORD.json
gets what this process saw: the restored steps and the checkpoint folder's
listing after each.
"""

import json
import os
import pathlib
import sys

from absl import logging
import jax
from jax.experimental import multihost_utils

from tests import test_checkpoint_damage as cases
from vit_jax import main as main_lib
from vit_jax.checkpoint import train_state


def main(workdir: str, record_path: str) -> None:
  """Runs the case on this process and writes its record."""
  logging.set_verbosity(logging.INFO)  # Into the log the test shows on failure.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  main_lib.initialize_distributed()
  checkpoints = os.path.join(workdir, train_state.CHECKPOINT_SUBDIR)
  record = {}
  with train_state.TrainCheckpointer(workdir) as checkpointer:
    for step in cases.STEPS:
      checkpointer.save(step, cases.make_state(step))
    checkpointer.wait_until_finished()
  multihost_utils.sync_global_devices('saved')
  if jax.process_index() == 0:
    cases.garble_data_file(pathlib.Path(checkpoints))
  multihost_utils.sync_global_devices('garbled')

  with train_state.TrainCheckpointer(workdir) as checkpointer:
    record['restored'] = checkpointer.restore(cases.make_state(0))['step']
    record['steps'] = list(checkpointer.all_steps())
    record['listing'] = sorted(os.listdir(checkpoints))
    checkpointer.save(3, cases.make_state(3))
    checkpointer.wait_until_finished()
    record['restored_again'] = checkpointer.restore(cases.make_state(0))['step']
  multihost_utils.sync_global_devices('done')
  record['final_listing'] = sorted(os.listdir(checkpoints))
  with open(record_path, 'w') as f:
    json.dump(record, f)


if __name__ == '__main__':
  main(*sys.argv[1:])
