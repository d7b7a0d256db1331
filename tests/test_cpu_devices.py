"""One JAX device per CPU core (`vit_jax.cpu_devices`).

The count is fixed when JAX starts its CPU backend, which this test session
has already done with 8 devices (conftest.py), so whether `configure`
reaches JAX is checked in fresh Python processes.
"""

import os
import pathlib
import subprocess
import sys

import jax
import ml_collections
import pytest

from vit_jax import cpu_devices
from vit_jax.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parent.parent

# Prints what `configure` returned and the devices JAX then has.
CONFIGURE = """
import jax, ml_collections
from vit_jax import cpu_devices
from vit_jax.errors import ConfigError
config = ml_collections.ConfigDict(dict(
    batch={batch}, batch_eval={batch_eval}, accum_steps=1, cpu_devices={asked}))
print(cpu_devices.configure(config), jax.local_device_count())
"""


def configure_in_fresh_process(xla_flags=None, **config):
  """`configure(config)` in a new process on CPU; (returned, devices)."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  if xla_flags:
    env['XLA_FLAGS'] = xla_flags
  output = subprocess.run(
    [sys.executable, '-c', CONFIGURE.format(**config)],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
    check=True,
  ).stdout.split()
  return output[0], int(output[1])


@pytest.mark.parametrize(
  'cores, batch, batch_eval, accum_steps, expected',
  [
    (2, 128, 500, 1, 2),
    (8, 128, 500, 1, 4),  # 500 splits over 4 devices, not 8.
    (6, 512, 512, 8, 4),  # 6 x 8 and 5 x 8 do not divide 512.
    (4, 3, 3, 1, 3),
    (2, 7, 7, 1, 1),
    (1, 64, 64, 1, 1),
  ],
)
def test_count_for_batches(cores, batch, batch_eval, accum_steps, expected):
  count = cpu_devices.count_for_batches(cores, batch, batch_eval, accum_steps)
  assert count == expected
  assert batch % (count * accum_steps) == 0 and batch_eval % count == 0


def test_user_chose_count():
  assert cpu_devices.user_chose_count(
    {
      'XLA_FLAGS': '--xla_cpu_use_onednn=true '
      '--xla_force_host_platform_device_count=3'
    }
  )
  assert cpu_devices.user_chose_count({'JAX_NUM_CPU_DEVICES': '3'})
  assert not cpu_devices.user_chose_count(
    {'XLA_FLAGS': '--xla_cpu_use_onednn=true'}
  )


def test_configure_keeps_a_started_backend(caplog):
  """This session's backend has 8 devices already: a new count is refused
  with a log line, not an exception."""
  assert len(jax.devices()) == 8  # Started (conftest.py's count).
  config = ml_collections.ConfigDict(
    dict(batch=6, batch_eval=6, accum_steps=1, cpu_devices=3)
  )
  assert cpu_devices.configure(config, environ={}) is None
  assert 'keeping its device count' in caplog.text


def test_configure_sets_one_device_per_core():
  returned, devices = configure_in_fresh_process(
    batch=128 * 3 * 5 * 7, batch_eval=128 * 3 * 5 * 7, asked=0
  )
  expected = cpu_devices.count_for_batches(
    cpu_devices.host_cores(), 128 * 3 * 5 * 7, 128 * 3 * 5 * 7
  )
  assert (returned, devices) == (str(expected), expected)


def test_configure_asked_count_and_users_flag():
  assert configure_in_fresh_process(batch=6, batch_eval=6, asked=3) == ('3', 3)
  # The environment's count wins over the config's.
  assert configure_in_fresh_process(
    xla_flags='--xla_force_host_platform_device_count=5',
    batch=6,
    batch_eval=6,
    asked=3,
  ) == ('None', 5)


def test_negative_count_is_a_config_error():
  config = ml_collections.ConfigDict(
    dict(batch=6, batch_eval=6, accum_steps=1, cpu_devices=-2)
  )
  with pytest.raises(ConfigError, match=r'config.cpu_devices=-2; give'):
    cpu_devices.configure(config, environ={})
