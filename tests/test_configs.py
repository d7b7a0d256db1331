"""Experiment configs parse from the command line exactly as vit_jax's."""

import pathlib

from absl import flags
import ml_collections
from ml_collections import config_flags
import pytest

from configs import common
from vit_jax import finetune
from vit_jax import models
from vit_jax import optim
from vit_jax import results
from vit_jax.models import registry

REPO = pathlib.Path(__file__).resolve().parent.parent


def parse(*args: str) -> ml_collections.ConfigDict:
  """Parses `--config=...` flags as `vit_jax.main` will."""
  argv = ['main', *args]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file(
    'config', flag_values=flag_values, sys_argv=argv
  )
  flag_values(argv)
  return flag_values.config


def test_vit_b16_cifar10():
  config = parse(f'--config={REPO}/configs/vit.py:b16,cifar10')
  assert config.model.model_name == 'ViT-B_16'
  assert config.model.to_dict() == models.MODEL_CONFIGS['ViT-B_16'].to_dict()
  assert config.dataset == 'cifar10'
  assert config.pp.to_dict() == {
    'train': 'train[:98%]',
    'test': 'test',
    'crop': 384,
    'augment': 'inception_crop',
    'pad': 0,
    'rotate': 0.0,
    'scale': 0.0,
    'shear': 0.0,
    'elastic': 0.0,
    'elastic_sigma': 4.0,
    'flip': True,
    'randaug': None,
    'randaug_exclude': (),
  }
  assert config.total_steps == 10_000
  assert config.base_lr == 0.01
  assert config.is_locked


def test_dataset_argument_is_honoured():
  # vit_jax's vit.py applies the cifar10 preset whatever the dataset is.
  config = parse(f'--config={REPO}/configs/vit.py:s16,oxford_iiit_pet')
  assert config.dataset == 'oxford_iiit_pet'
  assert config.total_steps == 500
  assert config.pp.train == 'train[:90%]'
  assert config.base_lr == 0.03


def test_overrides():
  config = parse(
    f'--config={REPO}/configs/vit.py:b16,cifar10',
    '--config.total_steps=7',
    '--config.model.transformer.num_layers=3',
    '--config.pp.crop=224',
  )
  assert config.total_steps == 7
  assert config.model.transformer.num_layers == 3
  assert config.pp.crop == 224


def test_unknown_model_lists_short_names():
  with pytest.raises(flags.IllegalFlagValueError, match='b17'):
    parse(f'--config={REPO}/configs/vit.py:b17,cifar10')
  with pytest.raises(ValueError, match='r50_b16'):
    registry.get_config('b17')


def test_missing_dataset_is_an_error():
  with pytest.raises(flags.IllegalFlagValueError, match='MODEL,DATASET'):
    parse(f'--config={REPO}/configs/vit.py:b16')


def test_mixer_config():
  config = parse(f'--config={REPO}/configs/mixer_base16_cifar10.py')
  assert config.model.model_name == 'Mixer-B_16'
  assert config.pp.crop == 224
  assert isinstance(
    models.build_model(config.model, num_classes=10), models.MlpMixer
  )


@pytest.mark.parametrize('dataset', sorted(common.DATASET_PRESETS))
def test_every_dataset_preset_parses(dataset):
  config = parse(f'--config={REPO}/configs/vit.py:ti16,{dataset}')
  assert config.dataset == dataset
  assert config.total_steps == common.DATASET_PRESETS[dataset].total_steps


def test_every_short_name_is_a_registered_model():
  short_names = [
    name[len('get_') : -len('_config')]
    for name in dir(registry)
    if name.startswith('get_')
    and name.endswith('_config')
    and name != 'get_config'
  ]
  built = {registry.get_config(short).model_name for short in short_names}
  assert built == set(models.MODEL_CONFIGS)


def test_optional_paths_can_be_set_from_the_command_line():
  config = parse(
    f'--config={REPO}/configs/vit.py:ti16,digits',
    '--config.tfds_data_dir=/data/tfds',
    '--config.tfds_manual_dir=/data/manual',
    '--config.pretrained_dir=/models',
    '--config.pretrained_path=/models/x.safetensors',
  )
  assert (config.tfds_data_dir, config.tfds_manual_dir) == (
    '/data/tfds',
    '/data/manual',
  )
  assert config.pretrained_dir == '/models'
  assert config.pretrained_path == '/models/x.safetensors'


def test_fine_tuning_starts_from_model_name_npz_unless_told_otherwise():
  """vit_jax's default pretrained_dir is '.'; an empty one (the explicit
  way to train from scratch) means no checkpoint."""
  config = parse(f'--config={REPO}/configs/vit.py:ti16,digits')
  assert results.pretrained_path(config) == 'ViT-Ti_16.npz'
  scratch = parse(
    f'--config={REPO}/configs/vit.py:ti16,digits', '--config.pretrained_dir='
  )
  assert results.pretrained_path(scratch) is None
  elsewhere = parse(
    f'--config={REPO}/configs/vit.py:ti16,digits',
    '--config.pretrained_dir=gs://b/m',
  )
  assert results.pretrained_path(elsewhere) == 'gs://b/m/ViT-Ti_16.npz'
  assert (
    parse(f'--config={REPO}/configs/scratch.py:digits').pretrained_dir is None
  )


@pytest.mark.parametrize('dataset', sorted(common.DATASET_PRESETS))
def test_every_preset_has_a_valid_schedule(dataset):
  config = common.with_dataset(common.get_config(), dataset)
  assert 0 < config.warmup_steps < config.total_steps
  schedule = optim.learning_rate_schedule(
    base_lr=config.base_lr,
    total_steps=config.total_steps,
    warmup_steps=config.warmup_steps,
    decay_type=config.decay_type,
  )
  # Warm-up from 0 to base_lr, then down to 0 by the last step.
  assert float(schedule(0)) == 0
  assert float(schedule(config.warmup_steps)) == pytest.approx(config.base_lr)
  assert float(schedule(config.total_steps)) == pytest.approx(0, abs=1e-9)


def test_configs_do_not_share_the_preset():
  first = common.with_dataset(common.get_config(), 'mnist5k')
  first.pp.crop = 99
  second = common.with_dataset(common.get_config(), 'mnist5k')
  assert second.pp.crop == 224
  assert common.DATASET_PRESETS['mnist5k'].pp.crop == 224


def test_fine_tuning_mode_is_switched_from_the_command_line():
  config = parse(
    f'--config={REPO}/configs/vit.py:ti16,digits',
    '--config.finetune.mode=injection',
    '--config.finetune.injection.method=lora',
    '--config.finetune.injection.targets=query,out',
    '--config.finetune.injection.rank=4',
    '--config.finetune.head.type=mlp',
  )
  fine = finetune.from_config(config.finetune)
  assert fine.describe() == 'injection (lora on query,out)'
  assert fine.injection.method.rank == 4
  assert finetune.build_model(config, 10).base.head_mlp_dim == 256
  default = finetune.from_config(
    parse(f'--config={REPO}/configs/vit.py:ti16,digits').finetune
  )
  assert (default.mode, default.injection) == ('full', None)


@pytest.mark.parametrize('dataset', ['mnist5k', 'digits'])
def test_scratch_warm_up_follows_total_steps_unless_set(dataset):
  """A shorter run (--config.total_steps=40) warms up for a sixteenth of
  its steps and builds its schedule; an explicit warm-up is kept."""
  config = parse(f'--config={REPO}/configs/scratch.py:{dataset}')
  assert config.warmup_steps == config.total_steps // 16
  short = parse(
    f'--config={REPO}/configs/scratch.py:{dataset}', '--config.total_steps=40'
  )
  assert short.warmup_steps == 2
  optim.from_config(short)  # Raises ConfigError for a warm-up too long.
  explicit = parse(
    f'--config={REPO}/configs/scratch.py:{dataset}',
    '--config.total_steps=40',
    '--config.warmup_steps=7',
  )
  assert (explicit.total_steps, explicit.warmup_steps) == (40, 7)
  assert explicit.eval_every == 0  # Only at the end, whatever the steps.
