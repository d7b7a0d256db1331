"""The package's layers: every import points down, none up or sideways.

A unit (a top-level module or sub-package of `vit_jax`) may import units of
lower layers and its own modules only. Entry points (`main`, `__main__`
modules) sit above everything, and nothing imports them. The package's own
`__init__` imports `cli` only.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'vit_jax'

# Lowest first. A new unit is placed here when it is added.
LAYERS = (
  ('errors',),
  ('paths',),
  (
    'cli',
    'cpu_devices',
    'trainable',
    'losses',
    'views',
    'mixing',
    'models',
    'input_pipeline',
    'workdir_lock',
  ),
  ('checkpoint', 'features', 'optim'),
  (
    'finetune',
    'fewshot',
    'steps',
    'results',
    'metrics',
    'utils',
    'test_utils',
  ),
  ('engine',),
  ('experiment',),
  ('publish', 'benchmarks', 'lifecycle', 'evaluation'),
  ('predict', 'attention', 'inference_time', 'config_checks'),
  ('train',),
)
ENTRY_POINTS = ('main', '__main__')
# The package's `__init__` runs first in `python -m vit_jax.X`; it may set up
# the command line and nothing else.
PACKAGE_IMPORTS = ('cli',)
LAYER_OF = {unit: index for index, units in enumerate(LAYERS) for unit in units}


def module_name(path: pathlib.Path) -> str:
  """'vit_jax.checkpoint.files' for vit_jax/checkpoint/files.py."""
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def imported_modules(path: pathlib.Path):
  """The `vit_jax` modules (or names in them) `path` imports."""
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      yield from (f'{node.module}.{alias.name}' for alias in node.names)


def unit(module: str) -> str:
  """The layered unit of a `vit_jax...` module name."""
  parts = module.split('.')
  if parts[-1] in ENTRY_POINTS:
    return parts[-1]
  return parts[1] if len(parts) > 1 else ''


SOURCES = sorted(PACKAGE.rglob('*.py'))


def test_every_unit_has_a_layer():
  units = {unit(module_name(p)) for p in SOURCES} - {'', *ENTRY_POINTS}
  assert units <= set(LAYER_OF), f'add {units - set(LAYER_OF)} to LAYERS'


@pytest.mark.parametrize(
  'path', SOURCES, ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_imports_point_down(path):
  importer = unit(module_name(path))
  upward = []
  for module in imported_modules(path):
    if not module.startswith('vit_jax.'):
      continue
    target = unit(module)
    if target in ENTRY_POINTS:
      upward.append(f'{module} (an entry point)')
    elif importer in ENTRY_POINTS or target == importer or not target:
      continue
    elif not importer and target in PACKAGE_IMPORTS:
      continue
    elif LAYER_OF[target] >= LAYER_OF.get(importer, -1):
      upward.append(module)
  assert not upward, f'{path.relative_to(PACKAGE)} imports {upward}'


# The training job reads top to bottom on a few screens; what surrounds its
# loop lives in `lifecycle` and `evaluation`, what it builds in `experiment`.
MAX_JOB_LINES = 150


def test_the_training_job_reads_in_a_few_screens():
  tree = ast.parse((PACKAGE / 'train.py').read_text())
  (job,) = [
    node
    for node in tree.body
    if isinstance(node, ast.FunctionDef) and node.name == 'train_and_evaluate'
  ]
  lines = job.end_lineno - job.lineno + 1
  assert lines <= MAX_JOB_LINES, (
    f'train_and_evaluate has {lines} lines; move a concern out of it'
  )
