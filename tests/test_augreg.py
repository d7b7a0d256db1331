"""AugReg checkpoints chosen by name from an index.csv in the published
columns, as vit_jax's `configs/augreg.py` and `model_or_filename` do."""

import csv

import pytest

from configs import augreg as augreg_config
from vit_jax import results
from vit_jax.checkpoint import augreg
from vit_jax.checkpoint import pretrained
from vit_jax.errors import CheckpointError
from vit_jax.errors import ConfigError

COLUMNS = (
  'name,ds,epochs,lr,aug,wd,do,sd,best_val,final_val,final_test,adapt_ds,'
  'adapt_lr,adapt_steps,adapt_resolution,adapt_final_val,adapt_final_test,'
  'params,infer_samples_per_sec,filename,adapt_filename'
).split(',')
B16_BEST = 'B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0'
ROWS = [
  # (name, ds, final_val, filename): the best i21k B_16 is not the best
  # B_16 overall (an i1k one is), nor the first row.
  ('B/16', 'i21k', 0.52, 'B_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.1'),
  ('B/16', 'i21k', 0.61, B16_BEST),
  ('B/16', 'i1k', 0.79, 'B_16-i1k-300ep-lr_0.001-aug_strong1-wd_0.1-do_0.0'),
  ('R+Ti/16', 'i21k', 0.4, 'R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03'),
]


def write_index(directory, rows=ROWS, columns=COLUMNS):
  with open(directory / augreg.INDEX_FILE, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for name, ds, final_val, filename in rows:
      # Each pre-training is listed once per fine-tuning, as published.
      for adapt_ds in ('cifar100', 'oxford_iiit_pet'):
        row = dict.fromkeys(columns, '0')
        row.update(
          name=name,
          ds=ds,
          final_val=final_val,
          filename=filename,
          adapt_ds=adapt_ds,
          adapt_filename=f'{filename}--{adapt_ds}-steps_10k-res_384',
        )
        writer.writerow({k: v for k, v in row.items() if k in columns})


def config_for(arg, directory):
  config = augreg_config.get_config(arg)
  config.pretrained_dir = str(directory)
  return config


def test_a_model_name_selects_its_best_i21k_pre_training(tmp_path):
  write_index(tmp_path)
  config = config_for('B_16,digits', tmp_path)
  assert config.model.model_name == 'ViT-B_16'
  assert config.model.transformer.dropout_rate == 0.0
  assert results.pretrained_path(config) == str(tmp_path / f'{B16_BEST}.npz')
  hybrid = config_for('R_Ti_16,digits', tmp_path)
  assert hybrid.model.model_name == 'R+ViT-Ti_16'
  assert results.pretrained_path(hybrid).endswith(
    '/R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03.npz'
  )


def test_a_filename_is_taken_as_it_is_without_an_index(tmp_path):
  name = 'S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0'
  config = config_for(f'{name},digits', tmp_path)
  assert config.model.model_name == 'ViT-S_16'
  assert results.pretrained_path(config) == str(tmp_path / f'{name}.npz')


def test_the_selected_checkpoint_must_exist_before_training(tmp_path):
  write_index(tmp_path)
  with pytest.raises(CheckpointError, match=f'{B16_BEST}.npz: no such file'):
    pretrained.check_exists(
      results.pretrained_path(config_for('B_16,digits', tmp_path))
    )


def test_bad_names_and_indexes_are_reported(tmp_path):
  with pytest.raises(ConfigError, match="Unknown AugReg model 'B_17'"):
    augreg_config.get_config('B_17,digits')
  with pytest.raises(CheckpointError, match='index.csv: no such file'):
    results.pretrained_path(config_for('B_16,digits', tmp_path))
  write_index(tmp_path, rows=ROWS[3:])
  with pytest.raises(CheckpointError, match="no i21k checkpoint of 'B_16'"):
    results.pretrained_path(config_for('B_16,digits', tmp_path))
  write_index(tmp_path, columns=[c for c in COLUMNS if c != 'final_val'])
  with pytest.raises(
    CheckpointError, match=r"lacks the columns \['final_val'\]"
  ):
    results.pretrained_path(config_for('B_16,digits', tmp_path))
