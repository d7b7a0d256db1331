"""User errors on the command line: one `error:` line, exit 1, no traceback.

Each case fails before anything compiles; the subprocesses cost JAX's and
TensorFlow's import time.
"""

import argparse
import os
import pathlib
import re
import subprocess
import sys

import ml_collections
import pytest

from tests import helpers
from vit_jax import cli
from vit_jax import main as main_lib
from vit_jax import train
from vit_jax.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRATCH = '--config=configs/scratch.py:mnist5k'


def run_module(module, *args, cwd=REPO, jax_platforms='cpu', env=()):
  """`python -m module args` from `cwd` (the repo root) on CPU (None: on
  the backends JAX finds), with the variables `env` set: (exit code,
  stderr)."""
  env = {**os.environ, 'JAX_PLATFORMS': jax_platforms or '', **dict(env)}
  process = subprocess.run(
    [sys.executable, '-m', module, *args],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  return process.returncode, process.stderr


def error_line(returncode, stderr):
  """The one `error:` line of a failed command's stderr."""
  assert returncode == 1, stderr[-3000:]
  assert 'Traceback' not in stderr, stderr[-3000:]
  lines = [line for line in stderr.splitlines() if line.startswith('error:')]
  assert len(lines) == 1, stderr[-3000:]
  return lines[0]


def test_a_misspelt_config_key_names_the_close_one(tmp_path):
  """The command line's overrides are checked before anything heavy is
  imported (`cli.unknown_key`, tested on more keys below)."""
  line = error_line(
    *run_module(
      'vit_jax.main',
      SCRATCH,
      '--config.finetune.mdoe=head',
      f'--workdir={tmp_path}',
    )
  )
  assert line == (
    "error: Unknown config key 'finetune.mdoe'; did you mean 'finetune.mode'?"
  )


def test_a_bad_run_fails_in_one_line_before_training(tmp_path):
  npz = tmp_path / 'random.npz'
  npz.write_bytes(os.urandom(4096))
  line = error_line(
    *run_module(
      'vit_jax.main',
      SCRATCH,
      f'--workdir={tmp_path / "run"}',
      f'--config.pretrained_path={npz}',
    )
  )
  assert line.startswith(f'error: {npz}: ')
  assert 'allow_pickle' not in line and 'pickled data' not in line


def test_a_workdir_that_is_a_file_is_a_config_error(tmp_path):
  path = tmp_path / 'file'
  path.write_text('')
  with pytest.raises(ConfigError, match=f'--workdir={path} is a file'):
    main_lib.check_workdir(str(path))


@pytest.mark.parametrize(
  'change, message',
  [
    (
      lambda config: config.update(batch=12),
      'config.batch=12 must be a positive multiple of the 8 devices',
    ),
    (
      lambda config: config.model.update(patches={'size': (16, 16)}),
      'Images of 8x8 pixels give a 0x0 token grid with 16x16 patches; feed '
      'larger images (config.pp.crop)',
    ),
  ],
)
def test_a_bad_run_is_refused_before_its_workdir_is_written(
  tmp_path, change, message
):
  config = helpers.job_config()
  change(config)
  workdir = tmp_path / 'run'
  with pytest.raises(ConfigError, match=re.escape(message)):
    train.train_and_evaluate(config, str(workdir))
  assert not workdir.exists() or not list(workdir.glob('checkpoints/*'))


def test_a_fine_tuning_config_without_its_checkpoint_stops(
  tmp_path, monkeypatch
):
  """As vit_jax, configs/vit.py fine-tunes ./MODEL_NAME.npz by default; a
  missing file stops the run before anything is written in its workdir.
  Outside the repository root, `--config=configs/vit.py:...` loads the
  installed config (which then looks for the file in the working
  directory)."""
  workdir = tmp_path / 'run'
  line = error_line(
    *run_module(
      'vit_jax.main',
      '--config=configs/vit.py:micro4,mnist5k',
      f'--workdir={workdir}',
      cwd=tmp_path,
    )
  )
  assert line.startswith(
    f'error: {tmp_path / "ViT-Micro_4.npz"}: no such file, and the config '
    'fine-tunes it.'
  )
  assert '--config.pretrained_dir= trains from scratch' in line
  assert not workdir.exists() or not list(workdir.iterdir())
  monkeypatch.chdir(tmp_path)
  argv = ['prog', '--config', 'configs/scratch.py', '--other=configs/vit.py']
  assert cli.with_installed_configs(argv, names=['config']) == [
    'prog',
    '--config',
    str(REPO / 'configs' / 'scratch.py'),
    '--other=configs/vit.py',
  ]
  (tmp_path / 'configs').mkdir()  # A local configs/ folder wins.
  (tmp_path / 'configs' / 'vit.py').write_text('')
  local = ['prog', '--config=configs/vit.py:b16,cifar10']
  assert cli.with_installed_configs(local, names=['config']) == local


def test_verbose_shows_the_traceback(tmp_path):
  returncode, stderr = run_module(
    'vit_jax.main',
    SCRATCH,
    '--verbose',
    f'--workdir={tmp_path}',
    '--config.trainer=typo',
  )
  assert returncode == 1 and 'Traceback' in stderr
  assert "ConfigError: config.trainer='typo'; choose one of" in stderr


# TensorFlow's start-up notice, and JAX's when it looks for a TPU.
# TensorFlow announces oneDNN or the CPU features its build does not use,
# depending on the CPU; JAX's backend probing names the TPU.
TENSORFLOW_NOTICES = (
  'oneDNN custom operations',
  'This TensorFlow binary is optimized',
)
JAX_NOTICE = 'Unable to initialize backend'
LIBRARY_NOTICES = (*TENSORFLOW_NOTICES, JAX_NOTICE)


def test_library_notices_show_only_with_verbose(tmp_path):
  """A run imports TensorFlow and starts JAX's backends (the device count
  checks config.batch) before it fails; the libraries' notices come only
  with --verbose, the project's lines always."""
  args = (SCRATCH, f'--workdir={tmp_path}', '--config.batch=0')
  # TensorFlow's own default: its INFO notices print (the tests' session
  # turns them off).
  env = {'TF_CPP_MIN_LOG_LEVEL': '0'}
  loud = run_module(
    'vit_jax.main', *args, '--verbose', jax_platforms=None, env=env
  )[1]
  quiet = run_module('vit_jax.main', *args, jax_platforms=None, env=env)[1]
  for stderr in (loud, quiet):
    assert 'JAX process 0 of 1' in stderr and 'config.batch=0' in stderr
  assert JAX_NOTICE in loud, loud
  assert any(notice in loud for notice in TENSORFLOW_NOTICES), loud
  assert not any(notice in quiet for notice in LIBRARY_NOTICES), quiet


def test_a_tool_whose_package_imports_tensorflow_is_quiet_too():
  """`vit_jax.predict`'s package imports TensorFlow before its __main__."""
  returncode, stderr = run_module('vit_jax.predict', SCRATCH)
  assert 'Give image files' in error_line(returncode, stderr)
  assert not any(notice in stderr for notice in TENSORFLOW_NOTICES), stderr


def test_tools_report_a_bad_checkpoint_in_one_line(tmp_path):
  path = tmp_path / 'random.npz'
  path.write_bytes(os.urandom(4096))
  assert str(path) in error_line(
    *run_module('vit_jax.checkpoint', 'inspect', str(path))
  )
  assert str(path) in error_line(
    *run_module('vit_jax.predict', SCRATCH, f'--checkpoint={path}', 'image.png')
  )


def test_unknown_keys_are_named_with_the_close_one_or_the_keys():
  config = ml_collections.ConfigDict({'pp': {'crop': 8, 'pad': 2}})
  assert cli.unknown_key(config, 'pp.crop') is None
  assert cli.unknown_key(config, 'pp.zzz') == (
    "Unknown config key 'pp.zzz'; the keys of pp are crop, pad."
  )
  config = ml_collections.ConfigDict({'total_steps': 5, 'pp': config.pp})
  assert cli.unknown_key(config, 'totl_steps') == (
    "Unknown config key 'totl_steps'; did you mean 'total_steps'?"
  )


def test_run_argparse_reports_expected_errors_and_keeps_bugs(capsys):
  def main(args):
    raise (ConfigError if args.kind == 'user' else KeyError)('the fault')

  def parser():
    result = argparse.ArgumentParser()
    result.add_argument('kind')
    return result

  with pytest.raises(SystemExit) as exit_info:
    cli.run_argparse(main, parser(), ['user'])
  assert exit_info.value.code == 1
  assert capsys.readouterr().err == 'error: the fault\n'
  with pytest.raises(ConfigError):
    cli.run_argparse(main, parser(), ['user', '--verbose'])
  with pytest.raises(KeyError):
    cli.run_argparse(main, parser(), ['bug'])


def test_ctrl_c_outside_a_training_loop_is_one_line(capsys):
  """A tool (or a run before it installs its signal handlers) stopped by
  Ctrl-C exits with status 130 and one line, without a traceback."""

  def main(args):
    del args
    raise KeyboardInterrupt

  with pytest.raises(SystemExit) as exit_info:
    cli.run_argparse(main, argparse.ArgumentParser(), [])
  assert exit_info.value.code == 130
  (line,) = capsys.readouterr().err.splitlines()
  assert line.startswith('error: stopped by Ctrl-C. Files already written')
