"""AugReg checkpoints ("How to train your ViT?", Steiner et al. 2021) by name.

Google publishes them as `gs://vit_models/augreg/{filename}.npz` with an
`index.csv` beside them: one row per (pre-training, fine-tuning) pair, with
the columns `name`, `ds` (pre-training data: `i1k`, `i21k`, `i21k_30`),
`lr`, `aug`, `wd`, `do`, `sd`, `best_val`, `final_val`, `final_test`,
`adapt_ds`, `adapt_lr`, `adapt_steps`, `adapt_resolution`,
`adapt_final_val`, `adapt_final_test`, `params`, `infer_samples_per_sec`,
`filename` and `adapt_filename`. As vit_jax's `model_or_filename`, a model
name (`B_16`, `R_Ti_16`, the part of a filename before its first `-`)
selects the ImageNet-21k pre-training with the best final validation
accuracy; a full filename (with `-`) is taken as it is.
"""

import csv
import io
from typing import Dict, List

from absl import logging

from vit_jax import paths
from vit_jax.errors import CheckpointError
from vit_jax.errors import ConfigError

DEFAULT_DIR = 'gs://vit_models/augreg'
INDEX_FILE = 'index.csv'
# The pre-training whose checkpoints a model name selects.
UPSTREAM = 'i21k'

# AugReg's model names (the first part of a filename) and this project's
# registry names: vit_jax's names without 'ViT-', with '_' for '+'.
MODELS: Dict[str, str] = {
  'Ti_16': 'ViT-Ti_16',
  'S_16': 'ViT-S_16',
  'B_16': 'ViT-B_16',
  'L_16': 'ViT-L_16',
  'S_32': 'ViT-S_32',
  'B_32': 'ViT-B_32',
  'B_8': 'ViT-B_8',
  'R_Ti_16': 'R+ViT-Ti_16',
  'R26_S_32': 'R26+ViT-S_32',
  'R26_B_32': 'R26+ViT-B_32',
  'R50_L_32': 'R50+ViT-L_32',
}


def model_name(model_or_filename: str) -> str:
  """The registry name of an AugReg model name or filename."""
  model = model_or_filename.split('-')[0]
  if model not in MODELS:
    raise ConfigError(
      f'Unknown AugReg model {model!r} (from {model_or_filename!r}); choose '
      f'one of {sorted(MODELS)}, or a filename of index.csv.'
    )
  return MODELS[model]


def read_index(directory: str) -> List[Dict[str, str]]:
  """The rows of `directory/index.csv` (local or gs://)."""
  path = paths.join(directory, INDEX_FILE)
  if not paths.exists(path):
    raise CheckpointError(
      f'{path}: no such file; config.pretrained_dir must hold the AugReg '
      f'index.csv ({DEFAULT_DIR}/{INDEX_FILE}) to choose a checkpoint by '
      'model name, or give a full filename.'
    )
  rows = list(csv.DictReader(io.StringIO(paths.read_text(path))))
  missing = {'filename', 'ds', 'final_val'} - set(rows[0] if rows else {})
  if missing:
    raise CheckpointError(
      f'{path}: lacks the columns {sorted(missing)} of the published '
      'AugReg index.'
    )
  return rows


def filename(directory: str, model_or_filename: str) -> str:
  """The checkpoint's filename (without `.npz`) in `directory`."""
  model_name(model_or_filename)  # A ConfigError for an unknown model.
  if '-' in model_or_filename:
    return model_or_filename
  rows = [
    row
    for row in read_index(directory)
    if row['filename'].split('-')[0] == model_or_filename
    and row['ds'] == UPSTREAM
  ]
  if not rows:
    raise CheckpointError(
      f'{paths.join(directory, INDEX_FILE)}: no {UPSTREAM} checkpoint of '
      f'{model_or_filename!r}.'
    )
  best = max(rows, key=lambda row: float(row['final_val']))
  logging.info(
    'AugReg: %s selected for %s (%s pre-training, final_val %s).',
    best['filename'],
    model_or_filename,
    UPSTREAM,
    best['final_val'],
  )
  return best['filename']
