"""Test session setup: 8 CPU devices, so pmap code runs data-parallel here,
and one persistent compilation cache for the session.

XLA reads the flag when JAX first initialises its backend, so it is set at
import of this file, before any test module imports JAX.

Many tests compile the same step functions of the same small models, in
this process, in pytest-xdist's workers and in the training processes they
start; JAX's persistent cache lets all of them compile each one once. The
folder is made by the first process that imports this file (pytest's main
process, whose environment the workers and the training processes inherit)
and removed when that process ends the session. A cache hit returns the
executable XLA compiled for the same program, so no result changes.
"""

import os
import shutil
import tempfile

os.environ['XLA_FLAGS'] = ' '.join(
  [os.environ.get('XLA_FLAGS', ''), '--xla_force_host_platform_device_count=8']
).strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

_CACHE_ENV = 'JAX_COMPILATION_CACHE_DIR'
_OWN_CACHE = _CACHE_ENV not in os.environ
if _OWN_CACHE:
  os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix='vit_jax-tests-jax-cache-')
# Every program, however quick to compile, however small.
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')


def pytest_unconfigure(config):
  """Removes the session's cache, in the process that made it."""
  if _OWN_CACHE and not hasattr(config, 'workerinput'):
    shutil.rmtree(os.environ[_CACHE_ENV], ignore_errors=True)
