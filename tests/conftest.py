"""Test session setup: 8 CPU devices, so pmap code runs data-parallel here,
and a persistent compilation cache for the session.

XLA reads the flag when JAX first initialises its backend, so it is set at
import of this file, before any test module imports JAX.

Many tests compile the same programs (the train and eval steps of
`helpers.job_config`, run again to resume or to compare). JAX's persistent
cache keys each compiled program by its HLO, devices and compiler options,
so a repeat loads the executable the first compile wrote instead of
compiling it again; what runs is the same. Each test process (an xdist
worker) gets its own folder, removed when it exits; subprocesses the tests
start (the CLI, the multi-host workers) inherit it through the environment.
"""

import atexit
import os
import shutil
import tempfile

import pytest

# The test programs are tiny: compiling them takes far longer than running
# them, and most of the compile time is LLVM's optimisation of the CPU code.
# The tests compile without it (what a program computes is unchanged; its
# floating-point sums may round differently).
FAST_COMPILE_FLAGS = (
  '--xla_backend_optimization_level=0',
  '--xla_llvm_disable_expensive_passes=true',
)
os.environ['XLA_FLAGS'] = ' '.join(
  [
    os.environ.get('XLA_FLAGS', ''),
    *FAST_COMPILE_FLAGS,
    '--xla_force_host_platform_device_count=8',
  ]
).strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# gcsfs chooses its file system class when imported (test modules import it
# at collection, before the `emulator` fixture sets its variables): its
# default one asks each bucket's layout from the storage-control API, which
# the emulator lacks, and looks for the GCE metadata server with a back-off
# before every request (minutes per test).
os.environ['GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT'] = 'false'

# A folder of this process's own: xdist workers would otherwise inherit the
# controller's, and one process may read an entry another is writing (JAX
# locks its cache only when it also evicts, and then scans the whole folder
# at each write). Subprocesses the tests start share their worker's.
_cache_dir = tempfile.mkdtemp(prefix='vit_jax-tests-xla-cache-')
atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache_dir
# The programs of the tiny test models compile in well under JAX's default
# threshold for caching (1 s).
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0.1'

# The files whose tests take longest (trainings, subprocesses), most costly
# first. xdist's loadfile gives each worker a whole file at a time, in
# collection order (pytest.ini's --no-loadscope-reorder: xdist would
# otherwise start the files with the most tests first and these last); a
# long file started last keeps one worker busy while the other has finished.
SLOW_FILES_FIRST = (
  'test_multihost.py',
  'test_train.py',
  'test_gcs.py',
  'test_engine.py',
  'test_lifecycle.py',
  'test_checkpoint_damage.py',
  'test_mixing.py',
  'test_layer_stack.py',
  'test_vit.py',
  'test_models.py',
  'test_finetune.py',
  'test_cli.py',
  'test_swin.py',
)


def pytest_collection_modifyitems(items):
  """Puts the tests of `SLOW_FILES_FIRST` first, in that order; the other
  files follow in their order."""

  def rank(item):
    name = item.path.name
    if name in SLOW_FILES_FIRST:
      return SLOW_FILES_FIRST.index(name)
    return len(SLOW_FILES_FIRST)

  items.sort(key=rank)


@pytest.fixture(scope='module')
def emulator():
  """A GCS API emulator serving `gs://test-bucket` (`tests.gcs_emulator`),
  with this process, and the processes it starts, pointed at it."""
  from tests import gcs_emulator  # Imports JAX: after XLA_FLAGS above.

  server = gcs_emulator.GcsEmulator()
  with pytest.MonkeyPatch.context() as patch:
    for key, value in server.environment().items():
      patch.setenv(key, value)
    yield server
  server.stop()
