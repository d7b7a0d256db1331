"""scripts/tpu_vm.sh --dry-run: the exact git and gcloud commands, unrun."""

import os
import shlex
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'scripts', 'tpu_vm.sh')
SSH = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'my-tpu']
WHERE = ['--zone=us-central2-b', '--worker=all']


def dry_run(*args: str) -> list:
  """The commands the script prints, each split as a shell would."""
  # No gcloud on PATH: a command that were run, not printed, would fail.
  env = dict(os.environ, PATH='/usr/bin:/bin')
  process = subprocess.run(
    ['bash', SCRIPT, '--dry-run', *args],
    capture_output=True,
    text=True,
    env=env,
    timeout=60,
    check=False,
  )
  assert process.returncode == 0, process.stderr
  return [shlex.split(line) for line in process.stdout.splitlines()]


def remote(command: list) -> str:
  """The shell command an ssh command runs on every worker."""
  assert command[: len(SSH) + len(WHERE)] == SSH + WHERE, command
  (flag,) = command[len(SSH) + len(WHERE) :]
  assert flag.startswith('--command=')
  return flag[len('--command=') :]


def test_launch_runs_main_distributed_on_every_worker():
  args = [
    '--config=configs/vit.py:b16,cifar10',
    '--workdir=gs://bucket/b16 run',  # A space survives both shells.
    '--config.finetune.mode=head',
  ]
  (command,) = dry_run('launch', 'my-tpu', 'us-central2-b', '--', *args)
  words = shlex.split(remote(command))
  main = words.index('vit_jax.main')
  assert words[: main + 1] == (
    'cd ~/vit_jax && . ~/venv/bin/activate && python -m vit_jax.main'.split()
  )
  assert words[main + 1 :] == args + ['--config.distributed=True']


def test_launch_without_arguments_passes_none():
  (command,) = dry_run('launch', 'my-tpu', 'us-central2-b')
  assert shlex.split(remote(command))[-2:] == [
    'vit_jax.main',
    '--config.distributed=True',
  ]


def test_setup_archives_head_copies_and_installs_on_every_worker():
  archive, copy, install = dry_run('setup', 'my-tpu', 'us-central2-b')
  assert archive[:3] == ['git', '-C', REPO]
  assert archive[3:6] == ['archive', '--format=tar.gz', '-o']
  assert archive[7] == 'HEAD' and archive[6].endswith('/vit_jax.tar.gz')
  assert copy == [
    'gcloud',
    'compute',
    'tpus',
    'tpu-vm',
    'scp',
    archive[6],
    'my-tpu:~/vit_jax.tar.gz',
    *WHERE,
  ]
  script = remote(install)
  assert 'tar -xzf ~/vit_jax.tar.gz -C ~/vit_jax' in script
  # The TPU build of the jax version requirements.txt installed.
  assert script.endswith(
    'pip install -q -r requirements.txt -e . && pip install -q '
    '"jax[tpu]==$(python -c "import jax; print(jax.__version__)")"'
  )


@pytest.mark.parametrize('args', [(), ('setup', 'my-tpu'), ('boot', 'a', 'b')])
def test_bad_usage_prints_the_usage(args):
  process = subprocess.run(
    ['bash', SCRIPT, '--dry-run', *args],
    capture_output=True,
    text=True,
    timeout=60,
    check=False,
  )
  assert process.returncode == 2
  assert 'scripts/tpu_vm.sh [--dry-run] launch' in process.stderr
  assert not process.stdout
