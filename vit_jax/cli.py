"""Command-line entry points: a user's mistake is one line, not a traceback.

  if __name__ == '__main__':
    cli.run(main)                        # an absl app: main(argv)
    cli.run_argparse(main, parser)       # argparse: main(args)

An expected error (`vit_jax.errors.Error` and its subclasses, a diverging
loss's `FloatingPointError`, `absl.app.UsageError`, a flag or config
override absl or ml_collections rejects) prints `error: MESSAGE` on stderr
and exits with status 1; any other exception is a bug and keeps its
traceback. `--verbose` shows the traceback of expected errors too, and
Orbax's INFO lines (about 40 per checkpoint, otherwise dropped).

A misspelt `--config.KEY` is reported against the config's keys:
`Unknown config key 'totl_steps'; did you mean 'total_steps'?`.
"""

import argparse
import difflib
import importlib.util
import logging
import os
import re
import sys
from typing import Any, Callable, List, NoReturn, Optional, Sequence, Tuple

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags
from ml_collections.config_flags import config_flags as config_flags_lib

from vit_jax import errors

EXPECTED_ERRORS = (errors.Error, FloatingPointError, app.UsageError)
VERBOSE_HELP = (
  'Show the Python traceback of expected errors, and the INFO logs of Orbax.'
)

_VERBOSE = flags.DEFINE_bool('verbose', False, VERBOSE_HELP)
_ORBAX_DIR = f'{os.sep}orbax{os.sep}'


def _fail(message: str) -> NoReturn:
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(1)


def _drop_orbax_info(record: logging.LogRecord) -> bool:
  """False for Orbax's records below WARNING. Orbax logs through absl's
  shared logger, so its records are told apart by the file that made them."""
  return record.levelno >= logging.WARNING or _ORBAX_DIR not in record.pathname


def _call(main: Callable[[], Any], verbose: bool) -> Any:
  """`main()`, with expected errors reported in one line unless `verbose`."""
  logger = logging.getLogger('absl')
  if verbose:
    logger.removeFilter(_drop_orbax_info)
  else:
    logger.addFilter(_drop_orbax_info)
  try:
    return main()
  except EXPECTED_ERRORS as e:
    if verbose:
      raise
    _fail(str(e))


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


def _verbose_in(argv: Sequence[str]) -> bool:
  """Whether `argv` sets --verbose, for when the flags fail to parse."""
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
    if _verbose_in(argv):
      raise
    _fail(_one_line(e))
  except (KeyError, AttributeError):  # How ml_collections rejects a key.
    message = _unknown_override(argv)
    if message is None or _verbose_in(argv):
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
