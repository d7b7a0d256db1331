"""What a run leaves in its workdir, for the tools that read it.

`results.json` (written by `train.train_and_evaluate`) records the test
metrics, the run's config and command line; publishing, the comparison
scripts and the model card read it back through `finished_results`.
`config.json` records the config the workdir's checkpoints were trained
with, so that a restart with another config is caught (`config_changes`).
"""

import copy
import json
from typing import AbstractSet, Any, Dict, List, Mapping, Optional, Tuple

from vit_jax import paths
from vit_jax.checkpoint import augreg
from vit_jax.errors import CheckpointError

RESULTS_FILE = 'results.json'
CONFIG_FILE = 'config.json'

# The config keys a restart may change and still continue the run: they set
# how long it runs, how often it reports, and how it uses memory and finds
# its data, not what the steps compute. Any other change (model, dataset,
# preprocessing, fine-tuning setup, optimizer, seed, batch...) would mix two
# runs in one set of checkpoints and overwrite the first run's outputs.
RESUMABLE_KEYS = frozenset(
  {
    # Extends or shortens the run; from the restored step on, the learning
    # rate follows the schedule of the new total.
    'total_steps',
    # When to evaluate, log and checkpoint.
    'eval_every',
    'progress_every',
    'checkpoint_every',
    # Memory and throughput: micro-batches give the update of the whole
    # batch; evaluation scores every example whatever its batch; a
    # rematerialised encoder computes the same gradients, and either
    # attention kernel the same attention.
    'accum_steps',
    'batch_eval',
    'cpu_devices',
    'prefetch',
    # How the same steps run over the devices: checkpoints hold global
    # arrays, restored into any engine, layout and device count.
    'engine',
    'fsdp',
    'fsdp_min_size',
    'model.transformer.remat',
    'model.transformer.remat_policy',
    'model.transformer.attention',
    # How each evaluation scores (`vit_jax.views`) and what else it
    # measures (`vit_jax.fewshot`).
    'eval_shift',
    'fewshot.shots',
    'fewshot.l2_reg',
    # Where tfds finds (or may download) the same dataset.
    'tfds_data_dir',
    'tfds_manual_dir',
    'tfds_download',
    # The override of this check itself (`configs/common.py`).
    'resume_anyway',
  }
)
# Config keys added after runs were first recorded, each with the value
# that computes what a run recorded without it computed: a record that
# lacks the key counts as holding that value, so such runs still resume.
ADDED_KEYS = {
  'ema_decay': 0.0,
  'pp.elastic': 0.0,
  'pp.elastic_sigma': 4.0,
  'pp.randaug': None,
  'pp.randaug_exclude': [],  # A tuple, as JSON records hold it.
  'model.transformer.remat': False,
  'model.transformer.remat_policy': 'nothing_saveable',
  'model.transformer.scan': False,
  'model.transformer.attention': 'explicit',
  'model.transformer.stochastic_depth': 0.0,
  'model.stochastic_depth': 0.0,  # Swin's.
  # As records hold them: JSON, a tuple a list.
  'layer_decay': None,
  'lr_mults': [],
  'wd_mults': [],
  'mix.mixup_alpha': 0.0,
  'mix.mixup_p': 0.0,
  'mix.cutmix_alpha': 0.0,
  'mix.switch_prob': 0.5,
  'mix.prob': 1.0,
  'random_erase.prob': 0.0,
  'random_erase.area_min': 0.02,
  'random_erase.area_max': 1 / 3,
}
_ABSENT = '(absent)'


# How to fix a damaged record, by file name (after "restore it from a
# backup, or").
_RECORD_FIXES = {
  RESULTS_FILE: (
    'move it aside and run the same command again: the run resumes from '
    'its last checkpoint and writes it anew'
  ),
  CONFIG_FILE: (
    'move it aside only if you are sure the workdir was trained with the '
    'config you start it with: without it, the check that a restart keeps '
    'the config is skipped, and the next run records its own'
  ),
}


def _read_record(path: str) -> Dict[str, Any]:
  """The JSON object in `path`; a one-line CheckpointError naming the file
  and its fix if it is not one (cut short by a full disk, overwritten)."""
  try:
    record = paths.read_json(path)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    problem = f'is not valid JSON ({e})'
  else:
    if isinstance(record, dict):
      return record
    problem = f'holds a JSON {type(record).__name__}, not an object'
  fix = _RECORD_FIXES[paths.name(path)]
  raise CheckpointError(
    f'{path} {problem}; it is damaged. Restore it from a backup, or {fix}.'
  )


def finished_results(workdir: str) -> Optional[Dict[str, Any]]:
  """The `results.json` of a run that finished in `workdir`, else None.

  Raises:
    CheckpointError: the file is not a JSON object.
  """
  path = paths.join(workdir, RESULTS_FILE)
  if not paths.exists(path):
    return None
  return _read_record(path)


def task_file_path(workdir: str, results: Mapping[str, Any]) -> Optional[str]:
  """The task file of the run whose `results` (its `results.json`) are in
  `workdir`, None if it wrote none. The record names it relative to the
  workdir, so a copied or moved workdir finds its own copy; a record that
  names it absolutely finds the file of that name in `workdir`."""
  name = results.get('task_file')
  if not name:
    return None
  if paths.is_remote(name) or name.startswith('/'):
    name = paths.name(name)
  return paths.join(workdir, name)


def pretrained_path(config: Mapping[str, Any]) -> Optional[str]:
  """The checkpoint a run starts from: `config.pretrained_path`, else
  `{config.pretrained_dir}/{name}.npz` with the AugReg checkpoint of
  `config.model_or_filename` (`configs/augreg.py`) or, by vit_jax's
  convention, `config.model.model_name` as name; else None (from scratch)."""
  if config.get('pretrained_path'):
    return config['pretrained_path']
  directory = config.get('pretrained_dir')
  if not directory:
    return None
  if config.get('model_or_filename'):
    name = augreg.filename(directory, config['model_or_filename'])
  else:
    name = config['model']['model_name']
  return paths.join(directory, f'{name}.npz')


def config_record(config: Any) -> Dict[str, Any]:
  """`config` (a ConfigDict) as flat `{'model.hidden_size': 768, ...}` JSON
  values: tuples become lists, as they do once written and read back, so a
  config equals its own record."""
  return _flatten(json.loads(config.to_json_best_effort()))


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> Dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping) and value:
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def write_config_record(workdir: str, config: Any) -> None:
  """Writes `config`'s record to `workdir/config.json` (atomically)."""
  paths.write_json(paths.join(workdir, CONFIG_FILE), config_record(config))


def read_config_record(workdir: str) -> Optional[Dict[str, Any]]:
  """The record in `workdir/config.json`, or None if there is none.

  Raises:
    CheckpointError: the file is not a JSON object.
  """
  path = paths.join(workdir, CONFIG_FILE)
  if not paths.exists(path):
    return None
  return _read_record(path)


def derived_keys(config: Any) -> AbstractSet[str]:
  """The keys of `config` (a ConfigDict whose references are not resolved
  yet) computed from a resumable integer key, such as `configs/scratch.py`'s
  `warmup_steps = total_steps // 16`: found by changing each such key in a
  copy and seeing which other keys follow. They follow it on a restart
  too, so a change in them does not stop a run from resuming."""
  base = config_record(config)
  derived = set()
  for key in RESUMABLE_KEYS:
    if not isinstance(base.get(key), int) or isinstance(base[key], bool):
      continue
    probe = copy.deepcopy(config)
    *parents, name = key.split('.')
    node = probe
    for parent in parents:
      node = node[parent]
    with probe.unlocked():
      node[name] = base[key] + 1000
    changed = config_record(probe)
    derived.update(k for k in base if k != key and changed.get(k) != base[k])
  return frozenset(derived)


def config_changes(
  recorded: Mapping[str, Any],
  config: Any,
  derived: AbstractSet[str] = frozenset(),
) -> List[Tuple[str, Any, Any]]:
  """`(key, recorded value, new value)` for every key outside
  `RESUMABLE_KEYS` and `derived` (`derived_keys`) where `config` differs
  from the `recorded` record, sorted by key; a key only one side has shows
  as '(absent)' on the other (for a key of `ADDED_KEYS` the record lacks,
  its value there)."""
  current = config_record(config)
  added = {k: v for k, v in ADDED_KEYS.items() if k in current}
  recorded = {**added, **recorded}
  return [
    (key, recorded.get(key, _ABSENT), current.get(key, _ABSENT))
    for key in sorted(set(recorded) | set(current))
    if key not in RESUMABLE_KEYS
    and key not in derived
    and recorded.get(key, _ABSENT) != current.get(key, _ABSENT)
  ]
