"""Nonsense config values are refused up front, naming the key the user set
(`vit_jax.config_checks`), and every shipped config passes."""

import pathlib
import re

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from configs import common
from tests import helpers
from tests.test_cli import error_line
from tests.test_cli import run_module
from tests.test_configs import parse
from vit_jax import config_checks
from vit_jax import fewshot
from vit_jax import finetune
from vit_jax import input_pipeline
from vit_jax import models
from vit_jax import train
from vit_jax.checkpoint import augreg
from vit_jax.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parent.parent
DIGITS = f'--config={REPO}/configs/scratch.py:digits'


def checked(*args: str) -> ml_collections.ConfigDict:
  """The config of command-line `args`, as `train_and_evaluate` checks it."""
  config = train.with_complete_pp(parse(*args))
  config_checks.check(config)
  return config


def with_values(config: ml_collections.ConfigDict, **values):
  """`config` with dotted keys ('pp__crop' for 'pp.crop') set."""
  for key, value in values.items():
    *parents, leaf = key.split('__')
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def refused(config: ml_collections.ConfigDict, message: str) -> None:
  """`check` raises a ConfigError whose message starts with `message`."""
  with pytest.raises(ConfigError, match='^' + message):
    config_checks.check(train.with_complete_pp(config))


# One case per rule: the value, and the start of the message naming it.
RANGE_CASES = [
  ({'total_steps': 0}, r'config\.total_steps=0 must be >= 1'),
  ({'progress_every': 0}, r'config\.progress_every=0 must be >= 1'),
  ({'checkpoint_every': -1}, r'config\.checkpoint_every=-1 must be >= 0'),
  ({'eval_every': -1}, r'config\.eval_every=-1 must be >= 0'),
  ({'base_lr': -0.1}, r'config\.base_lr=-0\.1 must be a number >= 0'),
  ({'label_smoothing': 1.0}, r'config\.label_smoothing=1\.0 .* in \[0, 1\)'),
  ({'label_smoothing': -0.1}, r'config\.label_smoothing=-0\.1 .* \[0, 1\)'),
  ({'batch': 0}, r'config\.batch=0 must be an integer >= 1'),
  ({'batch_eval': -8}, r'config\.batch_eval=-8 must be an integer >= 1'),
  ({'accum_steps': 0}, r'config\.accum_steps=0 must be an integer >= 1'),
  ({'grad_norm_clip': 0.0}, r'config\.grad_norm_clip=0\.0 .* > 0 or None'),
  ({'weight_decay': -1.0}, r'config\.weight_decay=-1\.0 must be .* >= 0'),
  ({'ema_decay': 1.0}, r'config\.ema_decay=1\.0 must be a number in \[0, 1\)'),
  ({'warmup_steps': -1}, r'config\.warmup_steps=-1 must be an integer >= 0'),
  ({'decay_type': 'step'}, r"config\.decay_type='step' must be one of"),
  ({'optimizer': 'lamb'}, r"config\.optimizer='lamb' must be one of"),
  ({'dtype': 'float16'}, r"config\.dtype='float16' must be one of"),
  ({'optim_dtype': 'int8'}, r"config\.optim_dtype='int8' must be one of"),
  ({'shuffle_buffer': 0}, r'config\.shuffle_buffer=0 must be an integer >= 1'),
  ({'prefetch': -1}, r'config\.prefetch=-1 must be an integer >= 0'),
  ({'cpu_devices': -2}, r'config\.cpu_devices=-2 must be an integer >= 0'),
  ({'fsdp_min_size': -1}, r'config\.fsdp_min_size=-1 must be an integer'),
  ({'eval_shift': -1}, r'config\.eval_shift=-1 must be an integer >= 0'),
  ({'eval_shift': 8}, r'config\.eval_shift=8 must be an integer in \[0, 7\]'),
  ({'pp__crop': 0}, r'config\.pp\.crop=0 must be an integer >= 1'),
  ({'pp__pad': -1}, r'config\.pp\.pad=-1 must be an integer >= 0'),
  ({'pp__rotate': 180.0}, r'config\.pp\.rotate=180\.0 .* in \[0, 180\)'),
  ({'pp__scale': 1.0}, r'config\.pp\.scale=1\.0 must be a number in \[0, 1\)'),
  ({'pp__shear': -1.0}, r'config\.pp\.shear=-1\.0 .* in \[0, 90\)'),
  ({'pp__elastic': -1.0}, r'config\.pp\.elastic=-1\.0 must be a number >= 0'),
  ({'pp__elastic_sigma': 0.0}, r'config\.pp\.elastic_sigma=0\.0 .* > 0'),
  ({'pp__augment': 'mixup'}, r"config\.pp\.augment='mixup'; choose one"),
  ({'fewshot__shots': (0, 5)}, r'config\.fewshot\.shots=\(0, 5\); give'),
  ({'fewshot__l2_reg': 0.0}, r'config\.fewshot\.l2_reg=0\.0 must be .* > 0'),
  ({'finetune__head__mlp_dim': 0}, r'config\.finetune\.head\.mlp_dim=0 must'),
  ({'finetune__head__dropout': 1.0}, r'config\.finetune\.head\.dropout=1\.0'),
  ({'finetune__injection__rank': 0}, r'config\.finetune\.injection\.rank=0'),
  ({'finetune__injection__alpha': 0.0}, r'config\.finetune\.injection\.alpha'),
  ({'finetune__mode': 'lora'}, r"config\.finetune\.mode='lora'; choose"),
  (
    {'model__transformer__dropout_rate': 1.0},
    r'config\.model\.transformer\.dropout_rate=1\.0 .* in \[0, 1\)',
  ),
  (
    {'model__transformer__attention_dropout_rate': -0.5},
    r'config\.model\.transformer\.attention_dropout_rate=-0\.5',
  ),
  ({'engine': 'jit'}, r"config\.engine='jit'; use one of"),
]


@pytest.mark.parametrize('values, message', RANGE_CASES)
def test_a_value_out_of_range_is_refused_naming_its_key(values, message):
  refused(with_values(parse(DIGITS), **values), message)


@pytest.mark.parametrize(
  'key, value',
  [
    ('batch', 'many'),
    ('seed', 1.5),
    ('base_lr', '0.1'),
    ('pp__crop', 16.0),
    ('label_smoothing', 'none'),
    ('pp__flip', 1),
    ('total_steps', '600'),
  ],
)
def test_a_value_of_the_wrong_type_is_refused(key, value):
  """Configs built in code escape `ConfigDict`'s type checks."""
  config = ml_collections.ConfigDict(parse(DIGITS).to_dict(), type_safe=False)
  name = key.replace('__', '.')
  refused(
    with_values(config, **{key: value}),
    re.escape(f'config.{name}={value!r} must be '),
  )


@pytest.mark.parametrize(
  'args, message',
  [
    # scratch.py derives warmup_steps (total_steps // 16) and bounds
    # eval_shift by the crop: the error names what the user typed.
    (('--config.total_steps=-16',), r'config\.total_steps=-16 must be >= 1'),
    (('--config.total_steps=0',), r'config\.total_steps=0 must be >= 1'),
    (('--config.pp.crop=0',), r'config\.pp\.crop=0 must be an integer >= 1'),
  ],
)
def test_the_key_the_user_set_is_blamed_not_a_derived_one(args, message):
  mnist5k = f'--config={REPO}/configs/scratch.py:mnist5k'
  assert parse(mnist5k).eval_shift == 1
  refused(parse(mnist5k, *args), message)


@pytest.mark.parametrize(
  'args, message',
  [
    (
      ('--config.model.patches.size=16',),
      r'config\.model\.patches\.size=\(16,\) must be two positive integers',
    ),
    (
      ('--config.model.patches.size=(0,4)',),
      r'config\.model\.patches\.size=\(0, 4\) must be two positive integers',
    ),
    (
      ('--config.pp.crop=18',),
      r'Images of 18x18 pixels give a 4x4 token grid with 4x4 patches, '
      r'which drop the last 2 rows and 2 columns of every image; set '
      r'config\.pp\.crop to 16 or 20',
    ),
    (
      ('--config.model.patches.size=(4,5)',),
      r'Images of 16x16 pixels give a 4x3 token grid with 4x5 patches, '
      r'which drop the last 0 rows and 1 columns',
    ),
    (
      ('--config.pp.crop=3',),
      r'Images of 3x3 pixels give a 0x0 token grid with 4x4 patches; feed '
      r'larger images \(config\.pp\.crop\)',
    ),
  ],
)
def test_patches_that_do_not_tile_the_crop_are_refused(args, message):
  refused(parse(DIGITS, *args), message)


def test_a_hybrid_s_patches_must_tile_the_resnet_root_s_features():
  """R+ViT-Ti/16's root downsamples 4x (rounding up), then 8x8 patches."""
  args = (f'--config={REPO}/configs/vit.py:r_ti16,cifar10',)
  refused(
    parse(*args, '--config.pp.crop=220'),
    r'Images of 220x220 pixels give a 6x6 token grid through the ResNet '
    r'root with 8x8 patches, which drop the last 7 rows and 7 columns of the '
    r'55x55 features; set config\.pp\.crop to 192 or 221',
  )
  checked(*args, '--config.pp.crop=221')  # 56x56 features: 7x7 tokens.


def test_a_swin_s_crop_must_fit_its_patches_and_windows():
  args = (f'--config={REPO}/configs/vit.py:swin_t,cifar10',)
  refused(
    parse(*args),
    r'config\.pp\.crop=384 does not fit this Swin \(config\.model\.'
    r'patch_size=4, config\.model\.window_size=7\): the 96x96 grid of stage '
    r'0 does not split into 7x7 windows; set config\.pp\.crop to 224 or 448',
  )
  refused(
    parse(*args, '--config.pp.crop=226'),
    r'config\.pp\.crop=226 .* its 4x4 patches drop the last 2 rows',
  )
  checked(*args, '--config.pp.crop=224')


def test_vit_h14_at_384_drops_pixels_and_is_refused():
  """384 is no multiple of 14: vit_jax's 384 crop loses 6 of every 384
  pixel rows and columns of ViT-H/14; the preset takes 392 instead."""
  refused(
    parse(
      f'--config={REPO}/configs/vit.py:h14,cifar10', '--config.pp.crop=384'
    ),
    r'Images of 384x384 pixels give a 27x27 token grid with 14x14 patches'
    r'.* set config\.pp\.crop to 378 or 392',
  )
  assert checked(f'--config={REPO}/configs/vit.py:h14,cifar10').pp.crop == 392


def test_families_without_dropped_pixels_take_any_crop():
  """A Mixer pads a partial patch ('SAME'); a ResNet has no patches."""
  checked(
    f'--config={REPO}/configs/vit.py:mixer_b16,cifar10', '--config.pp.crop=200'
  )
  checked(
    f'--config={REPO}/configs/vit.py:resnet_ti,cifar10', '--config.pp.crop=201'
  )


def test_a_config_without_a_model_is_refused():
  config = common.with_dataset(common.get_config(), 'digits')
  refused(config, r'config\.model is not set')


@pytest.mark.parametrize(
  'targets, message',
  [
    (' , ', r"config\.finetune\.injection\.targets=' , ' names no layer kind"),
    (
      'key,keys',
      r"Unknown injection target\(s\) \['keys'\] in "
      r"config\.finetune\.injection\.targets='key,keys'",
    ),
  ],
)
def test_injection_targets_that_name_nothing_are_refused(targets, message):
  config = parse(DIGITS, '--config.finetune.mode=injection')
  refused(with_values(config, finetune__injection__targets=targets), message)


def test_injection_targets_the_model_lacks_list_those_it_has():
  """The layers exist once the model does: `InjectedModel.init` checks."""
  config = parse(
    DIGITS,
    '--config.finetune.mode=injection',
    '--config.finetune.injection.targets=query,mlp_hidden',
  )
  config.model = models.MODEL_CONFIGS[
    'Mixer-Mini_4'
  ].copy_and_resolve_references()
  config = train.with_complete_pp(config)
  config_checks.check(config)  # 'query' is a known kind.
  model = finetune.build_model(config, 10)
  images = jnp.zeros([1, 16, 16, 3])
  with pytest.raises(
    ConfigError,
    match=r"targets \['query'\] match no layer of this model; set "
    r'config\.finetune\.injection\.targets to some of '
    r'mlp_hidden,mlp_output,layernorm',
  ):
    jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))


def test_more_shots_than_the_smallest_class_holds_are_refused():
  """digits' training split holds 1,437 images, at most 160 of a class."""
  config = helpers.job_config(dataset='digits', batch_eval=512)
  config.fewshot.shots = (1, 300)
  source = input_pipeline.get_source(config.dataset)
  model = models.build_model(config.model, num_classes=10)
  with pytest.raises(
    ConfigError,
    match=r'config\.fewshot\.shots=\(1, 300\) asks for 300 training images '
    r"per class, but class \d \('[^']*'\) has only \d+ in split 'train'; give "
    r'shots of at most \d+, e.g. --config\.fewshot\.shots="\(1,\)"',
  ):
    fewshot.Evaluator(model, source, config)


def test_check_shots_fit_names_the_rarest_class():
  labels = [0, 0, 0, 1, 2, 2]
  fewshot.check_shots_fit((1,), labels, ('a', 'b', 'c'), 'train')
  with pytest.raises(ConfigError, match=r"class 1 \('b'\) has only 1 in"):
    fewshot.check_shots_fit((1, 2), labels, ('a', 'b', 'c'), 'train')
  with pytest.raises(ConfigError, match=r"class 3 \('d'\) has no image"):
    fewshot.check_shots_fit((1,), labels, ('a', 'b', 'c', 'd'), 'train')


# The shipped configs with each argument their docstrings name.
VIT_MODELS = [
  'ti16', 's16', 'b16', 'l16', 'b8', 's32', 'b32', 'l32', 'r_ti16',
  'r50_b16', 'r26_s32', 'r26_b32', 'r50_l32', 's16_gap_norep',
  'b16_gap_norep', 's32_gap_norep', 'b32_gap_norep', 'testing',
  'mixer_b16', 'mixer_b32', 'mixer_l16',
]  # fmt: skip
SCRATCH_MODELS = [
  '', 'micro4', 'mini4', 'mini7', 'mini7_mlp256', 'mini_c3', 'ti4',
  'mixer_mini4', 'resnet_micro', 'resnet_mini', 'resnet_mini_222',
]  # fmt: skip
SHIPPED = (
  [
    f'vit.py:{model},{dataset}'
    for model in VIT_MODELS
    for dataset in sorted(common.DATASET_PRESETS)
  ]
  # The 14-pixel patches, and Swin's 4-pixel patches in 7x7 windows, tile
  # the presets' 224, not their 384.
  + [
    f'vit.py:{model},{dataset}'
    for model in ('h14', 'g14', 'G14', 'swin_t', 'swin_s', 'swin_b')
    for dataset in sorted(common.DATASET_PRESETS)
    if common.DATASET_PRESETS[dataset].pp.crop == 224
  ]
  + [f'augreg.py:{m},cifar10' for m in sorted(augreg.MODELS)]
  + ['mixer_base16_cifar10.py']
  + [f'scratch.py:mnist5k,{m}'.rstrip(',') for m in SCRATCH_MODELS]
  + [f'scratch.py:mnist5k,{m}' for m in ('swin_mini2', 'swin_mini2_w56')]
  # 7-pixel patches tile mnist5k's 28, not digits' 16.
  + [
    f'scratch.py:digits,{m}'.rstrip(',')
    for m in SCRATCH_MODELS
    if not m.startswith('mini7')
  ]
)


@pytest.mark.parametrize('config_arg', SHIPPED)
@pytest.mark.parametrize('directory', ['configs', 'vit_jax/configs'])
def test_every_shipped_config_passes(directory, config_arg):
  checked(f'--config={REPO}/{directory}/{config_arg}')


def test_the_command_line_names_total_steps_in_one_line(tmp_path):
  line = error_line(
    *run_module(
      'vit_jax.main',
      '--config=configs/scratch.py:digits',
      f'--workdir={tmp_path}',
      '--config.total_steps=0',
    )
  )
  assert line.startswith('error: config.total_steps=0 must be >= 1'), line
