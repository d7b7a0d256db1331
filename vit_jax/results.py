"""What a run leaves in its workdir, for the tools that read it.

`results.json` (written by `train.train_and_evaluate`) records the test
metrics, the run's config and command line; publishing, the comparison
scripts and the model card read it back through `finished_results`.
`config.json` records the config the workdir's checkpoints were trained
with, so that a restart with another config is caught (`config_changes`).
"""

import json
from typing import Any, Dict, List, Mapping, Optional, Tuple

from vit_jax import paths
from vit_jax.checkpoint import augreg

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
  'model.transformer.remat': False,
  'model.transformer.remat_policy': 'nothing_saveable',
  'model.transformer.scan': False,
  'model.transformer.attention': 'explicit',
}
_ABSENT = '(absent)'


def finished_results(workdir: str) -> Optional[Dict[str, Any]]:
  """The `results.json` of a run that finished in `workdir`, else None."""
  path = paths.join(workdir, RESULTS_FILE)
  if not paths.exists(path):
    return None
  return paths.read_json(path)


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
  """The record in `workdir/config.json`, or None if there is none."""
  path = paths.join(workdir, CONFIG_FILE)
  if not paths.exists(path):
    return None
  return paths.read_json(path)


def config_changes(
  recorded: Mapping[str, Any], config: Any
) -> List[Tuple[str, Any, Any]]:
  """`(key, recorded value, new value)` for every key outside
  `RESUMABLE_KEYS` where `config` differs from the `recorded` record, sorted
  by key; a key only one side has shows as '(absent)' on the other (for
  a key of `ADDED_KEYS` the record lacks, its value there)."""
  current = config_record(config)
  added = {k: v for k, v in ADDED_KEYS.items() if k in current}
  recorded = {**added, **recorded}
  return [
    (key, recorded.get(key, _ABSENT), current.get(key, _ABSENT))
    for key in sorted(set(recorded) | set(current))
    if key not in RESUMABLE_KEYS
    and recorded.get(key, _ABSENT) != current.get(key, _ABSENT)
  ]
