"""Test session setup: 8 CPU devices, so pmap code runs data-parallel here.

XLA reads the flag when JAX first initialises its backend, so it is set at
import of this file, before any test module imports JAX.
"""

import os

os.environ['XLA_FLAGS'] = ' '.join(
  [os.environ.get('XLA_FLAGS', ''), '--xla_force_host_platform_device_count=8']
).strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
