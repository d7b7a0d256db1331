"""Command-line entry points: a user's mistake is one line, not a traceback.

  if __name__ == '__main__':
    cli.run(main)                        # an absl app: main(argv)
    cli.run_argparse(main, parser)       # argparse: main(args)

An expected error (`vit_jax.errors.Error` and its subclasses, a diverging
loss's `FloatingPointError`, `absl.app.UsageError`, a flag or config
override absl or ml_collections rejects) prints `error: MESSAGE` on stderr
and exits with status 1; any other exception is a bug and keeps its
traceback. `--verbose` shows the traceback of expected errors too, and the
libraries' own start-up and INFO lines, otherwise dropped (`quiet_libraries`):
TensorFlow's oneDNN notice, JAX's "Unable to initialize backend" probes and
Orbax's INFO lines (about 40 per checkpoint).

A misspelt `--config.KEY` is reported against the config's keys:
`Unknown config key 'totl_steps'; did you mean 'total_steps'?`.
"""

import argparse
import contextlib
import difflib
import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import tempfile
from typing import (
  Any,
  Callable,
  Iterator,
  List,
  NoReturn,
  Optional,
  Sequence,
  Tuple,
)

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags
from ml_collections.config_flags import config_flags as config_flags_lib

from vit_jax import errors

EXPECTED_ERRORS = (errors.Error, FloatingPointError, app.UsageError)
VERBOSE_HELP = (
  'Show the Python traceback of expected errors, and the start-up and INFO '
  'lines of TensorFlow, JAX and Orbax.'
)

_VERBOSE = flags.DEFINE_bool('verbose', False, VERBOSE_HELP)
_ORBAX_DIR = f'{os.sep}orbax{os.sep}'
# Logs, at INFO, each accelerator backend JAX fails to find.
_JAX_BACKEND_LOGGER = 'jax._src.xla_bridge'
# The lines TensorFlow's C++ code writes to stderr while it loads, which
# TF_CPP_MIN_LOG_LEVEL does not drop (TensorFlow 2.21): the oneDNN notice,
# twice, each after absl's note on early logging, and the CPU feature notice
# (two lines).
_TENSORFLOW_LOAD_NOTICES = (
  b'All log messages before absl::InitializeLog() is called',
  b'oneDNN custom operations are on',
  b'This TensorFlow binary is optimized to use available CPU instructions',
  b'To enable the following instructions:',
)


def _fail(message: str) -> NoReturn:
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(1)


def _drop_orbax_info(record: logging.LogRecord) -> bool:
  """False for Orbax's records below WARNING, and for those with a
  traceback: a failed background save, which the checkpointer reports
  itself, in one line (`train_state.TrainCheckpointer`). Orbax logs
  through absl's shared logger, so its records are told apart by the file
  that made them."""
  if _ORBAX_DIR not in record.pathname:
    return True
  return record.levelno >= logging.WARNING and not record.exc_info


@contextlib.contextmanager
def _stderr_without(notices: Sequence[bytes]) -> Iterator[None]:
  """Holds back what is written to file descriptor 2 inside (by Python or
  C++ code), then writes it out without the lines holding one of
  `notices`."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      held.seek(0)
      lines = held.read().splitlines(keepends=True)
      os.write(
        2, b''.join(x for x in lines if not any(n in x for n in notices))
      )


class _QuietLoader(importlib.abc.Loader):
  """Runs `loader`'s module with `notices` dropped from stderr; any other
  method is `loader`'s."""

  def __init__(self, loader: importlib.abc.Loader, notices: Sequence[bytes]):
    self._loader = loader
    self._notices = notices

  def __getattr__(self, name: str) -> Any:
    return getattr(self._loader, name)

  def create_module(self, spec):
    return self._loader.create_module(spec)

  def exec_module(self, module) -> None:
    with _stderr_without(self._notices):
      self._loader.exec_module(module)


class _QuietImport(importlib.abc.MetaPathFinder):
  """The first import of `name` (found by the other finders) drops
  `notices` from stderr while the module loads."""

  def __init__(self, name: str, notices: Sequence[bytes]):
    self._name = name
    self._notices = notices

  def find_spec(self, fullname, path, target=None):
    if fullname != self._name:
      return None
    sys.meta_path.remove(self)  # Once; the other finders find the module.
    spec = importlib.util.find_spec(fullname)
    if spec is not None and spec.loader is not None:
      spec.loader = _QuietLoader(spec.loader, self._notices)
    return spec


_QUIET_TENSORFLOW = _QuietImport('tensorflow', _TENSORFLOW_LOAD_NOTICES)


def quiet_libraries(verbose: bool) -> None:
  """Unless `verbose`, keeps the console to the project's own lines: drops
  TensorFlow's start-up notices (oneDNN, CPU features), JAX's backend
  probing ("Unable to initialize backend 'tpu'"), Orbax's INFO lines and
  the tracebacks of its failed background work (reported by the
  checkpointer in one line).
  Only messages go: oneDNN stays on (TF_ENABLE_ONEDNN_OPTS would change
  TensorFlow's kernels).

  TensorFlow prints its notices while it loads, so `python -m vit_jax.X`
  calls this first, from the package's `__init__` (which runs before the
  entry point's own package imports TensorFlow).
  """
  absl_logger = logging.getLogger('absl')
  backend_logger = logging.getLogger(_JAX_BACKEND_LOGGER)
  # Orbax's event loops, after a failed write or read, leave futures whose
  # errors the checkpointer has already reported in one line.
  asyncio_logger = logging.getLogger('asyncio')
  if verbose:
    absl_logger.removeFilter(_drop_orbax_info)
    backend_logger.setLevel(logging.NOTSET)
    asyncio_logger.setLevel(logging.NOTSET)
    if _QUIET_TENSORFLOW in sys.meta_path:
      sys.meta_path.remove(_QUIET_TENSORFLOW)
    return
  absl_logger.addFilter(_drop_orbax_info)
  backend_logger.setLevel(logging.WARNING)
  asyncio_logger.setLevel(logging.CRITICAL)
  if 'tensorflow' not in sys.modules and _QUIET_TENSORFLOW not in sys.meta_path:
    sys.meta_path.insert(0, _QUIET_TENSORFLOW)


def _call(main: Callable[[], Any], verbose: bool) -> Any:
  """`main()`, with expected errors reported in one line unless `verbose`."""
  quiet_libraries(verbose)
  try:
    return main()
  except EXPECTED_ERRORS as e:
    if verbose:
      raise
    _fail(str(e))
  except KeyboardInterrupt:
    if verbose:
      raise
    print(
      'error: stopped by Ctrl-C. Files already written are whole (each is '
      'replaced in one step); a training run resumes from its latest '
      'checkpoint when started again.',
      file=sys.stderr,
      flush=True,
    )
    sys.exit(130)


def unknown_key(config: Any, path: str, name: str = 'config') -> Optional[str]:
  """What is wrong with the dotted override `path` of `config`, if a key is
  missing: "Unknown config key 'finetune.mdoe'; did you mean ...?"."""
  node, parts = config, path.split('.')
  for depth, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict):
      return None  # An index or a field of another type: not a key error.
    if part in node:
      node = node[part]
      continue
    prefix = ''.join(f'{p}.' for p in parts[:depth])
    close = difflib.get_close_matches(part, list(node.keys()), n=1)
    hint = (
      f"did you mean '{prefix}{close[0]}'?"
      if close
      else f'the keys{" of " + prefix[:-1] if prefix else ""} are '
      f'{", ".join(sorted(node.keys()))}.'
    )
    return f"Unknown {name} key '{prefix}{part}'; {hint}"
  return None


def _flag_position(argv: Sequence[str], name: str) -> Optional[Tuple[int, str]]:
  """Where the value of `--name=VALUE` or `--name VALUE` is in `argv`:
  `(index, prefix)` with `argv[index] == prefix + VALUE`; None if absent."""
  for i, arg in enumerate(argv):
    match = re.fullmatch(rf'(--?{re.escape(name)})(=.*)?', arg)
    if match:
      if match.group(2) is not None:
        return i, f'{match.group(1)}='
      return (i + 1, '') if i + 1 < len(argv) else None
  return None


def _flag_argument(argv: Sequence[str], name: str) -> Optional[str]:
  """The value of `--name=VALUE` or `--name VALUE` in `argv`, if given."""
  position = _flag_position(argv, name)
  if position is None:
    return None
  index, prefix = position
  return argv[index][len(prefix) :]


def _unknown_override(argv: Sequence[str]) -> Optional[str]:
  """The unknown-key message of the first `--CONFIG.PATH` override in `argv`
  naming a key its config file lacks (None if every key exists)."""
  for name in list(flags.FLAGS):
    flag = flags.FLAGS[name]
    # `is_config_flag` is public, though the package does not export it.
    argument = (
      _flag_argument(argv, name)
      if config_flags_lib.is_config_flag(flag)
      else None
    )
    if argument is None:
      continue
    config = flag.parser.parse(argument)  # The config without overrides.
    for arg in argv:
      match = re.match(rf'--?(no)?{re.escape(name)}\.([^=]+)', arg)
      message = match and unknown_key(config, match.group(2), name)
      if message:
        return message
  return None


def _one_line(error: flags.Error) -> str:
  """absl's message; for a config file whose `get_config` raised, the flag
  and that exception's last line instead of ml_collections' traceback."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if any(line.startswith('Traceback') for line in lines):
    return f'{lines[0]} {lines[-1]}'
  return ' '.join(lines)


def verbose_in(argv: Sequence[str]) -> bool:
  """Whether `argv` sets --verbose, before (or without) parsing the
  flags."""
  values = flags.FlagValues()
  flags.DEFINE_bool('verbose', False, VERBOSE_HELP, flag_values=values)
  try:
    values(list(argv), known_only=True)
  except flags.Error:
    return False
  return values.verbose


CONFIGS_PREFIX = 'configs/'


def _installed_config(path: str) -> Optional[str]:
  """For `configs/FILE.py` missing in the working directory, the same file
  of the importable `configs` package (installed with vit_jax), if any."""
  if not path.startswith(CONFIGS_PREFIX) or os.path.exists(path):
    return None
  spec = importlib.util.find_spec('configs')
  for folder in (spec and spec.submodule_search_locations) or ():
    candidate = os.path.join(folder, path[len(CONFIGS_PREFIX) :])
    if os.path.isfile(candidate):
      return candidate
  return None


def with_installed_configs(
  argv: Sequence[str], names: Optional[Sequence[str]] = None
) -> List[str]:
  """`argv` with `--config=configs/FILE.py[:ARGS]` pointing at the installed
  config when run outside the repository root, so the repository's commands
  work from any directory once vit_jax is installed. `names`: the config
  flags (default: every config flag defined)."""
  if names is None:
    names = [
      n for n in flags.FLAGS if config_flags_lib.is_config_flag(flags.FLAGS[n])
    ]
  argv = list(argv)
  for name in names:
    position = _flag_position(argv, name)
    if position is None:
      continue
    index, prefix = position
    path, sep, args = argv[index][len(prefix) :].partition(':')
    installed = _installed_config(path)
    if installed:
      argv[index] = f'{prefix}{installed}{sep}{args}'
  return argv


def _parse_flags(argv: List[str]) -> List[str]:
  """absl's flag parsing, its errors and unknown config keys in one line."""
  argv = with_installed_configs(argv)
  try:
    argv = flags.FLAGS(argv)
  except flags.Error as e:
    if verbose_in(argv):
      raise
    _fail(_one_line(e))
  except (KeyError, AttributeError):  # How ml_collections rejects a key.
    message = _unknown_override(argv)
    if message is None or verbose_in(argv):
      raise
    _fail(message)
  for name in list(flags.FLAGS):
    flag = flags.FLAGS[name]
    if (
      config_flags_lib.is_config_flag(flag)
      and flag.value is not None
      and not isinstance(flag.value, ml_collections.ConfigDict)
    ):
      # ml_collections defers a missing file's error to the first access.
      _fail(
        f'--{name}={config_flags.get_config_filename(flag)}: cannot load '
        f'this config file; give FILE.py or FILE.py:ARGS (relative to '
        f'{os.getcwd()}).'
      )
  return argv


def run(main: Callable[[List[str]], Any]) -> NoReturn:
  """`absl.app.run(main)`, with expected errors in one line (module doc)."""
  app.run(
    lambda argv: _call(lambda: main(argv), _VERBOSE.value),
    flags_parser=_parse_flags,
  )


def run_argparse(
  main: Callable[[argparse.Namespace], Optional[int]],
  parser: argparse.ArgumentParser,
  argv: Optional[Sequence[str]] = None,
) -> NoReturn:
  """Parses `argv` (default: the command line) with `parser`, plus
  `--verbose` anywhere in it, calls `main(args)` with expected errors in one
  line (module doc), and exits with its return value (None: 0)."""
  parser.add_argument('--verbose', action='store_true', help=VERBOSE_HELP)
  verbose_parser = argparse.ArgumentParser(add_help=False)
  verbose_parser.add_argument('--verbose', action='store_true')
  known, rest = verbose_parser.parse_known_args(argv)
  args = parser.parse_args(rest)
  sys.exit(_call(lambda: main(args), known.verbose) or 0)
