"""Registered model configurations, keyed by the name Google published under.

Each `get_<name>_config()` returns the keyword arguments of a model class
(`VisionTransformer`, `MlpMixer` or `ResNet`) as an
`ml_collections.ConfigDict`; the `_register` decorator stores a locked copy
in `MODEL_CONFIGS` under its `model_name` (e.g. 'ViT-B_16', 'R50+ViT-B_16',
'Mixer-B_16', the basenames of the files in gs://vit_models, or the
'ResNet-*' baselines) and records the resolution the model is usually run at
in `DEFAULT_RESOLUTIONS`. Experiment configs (`configs/*.py`) call the
`get_<name>_config()` functions by name: `configs/vit.py:b16,cifar10`.
"""

from typing import Callable, Dict, Tuple

import ml_collections

ConfigFn = Callable[[], ml_collections.ConfigDict]

MODEL_CONFIGS: Dict[str, ml_collections.ConfigDict] = {}
DEFAULT_RESOLUTIONS: Dict[str, int] = {}


def _register(resolution: int = 224) -> Callable[[ConfigFn], ConfigFn]:
  """Returns a decorator that adds a config function's model to the registry."""

  def decorator(get_config: ConfigFn) -> ConfigFn:
    config = get_config().lock()
    name = config.model_name
    if name in MODEL_CONFIGS:
      raise ValueError(f'Model {name!r} is registered twice.')
    MODEL_CONFIGS[name] = config
    DEFAULT_RESOLUTIONS[name] = resolution
    return get_config

  return decorator


def _vit(
  name: str,
  patch: int,
  hidden: int,
  mlp: int,
  heads: int,
  layers: int,
  dropout: float = 0.0,
) -> ml_collections.ConfigDict:
  """A plain ViT config with vit_jax's defaults (class token, no pre-logits)."""
  return ml_collections.ConfigDict(
    {
      'model_name': name,
      'patches': {'size': (patch, patch)},
      'hidden_size': hidden,
      'transformer': {
        'mlp_dim': mlp,
        'num_heads': heads,
        'num_layers': layers,
        'attention_dropout_rate': 0.0,
        'dropout_rate': dropout,
        # Stochastic depth of the last block (`vit.drop_path_rates`); 0: off.
        'stochastic_depth': 0.0,
        # How the encoder computes, not what (`vit.Encoder`'s defaults);
        # here so that the command line can set them.
        'remat': False,
        'remat_policy': 'nothing_saveable',
        'scan': False,
        'attention': 'explicit',
      },
      'classifier': 'token',
      'representation_size': None,
    }
  )


def _variant(
  config: ml_collections.ConfigDict, name: str, **changes
) -> ml_collections.ConfigDict:
  """A copy of `config` renamed to `name` with top-level `changes`."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.model_name = name
  config.update(changes)
  return config


def _hybrid(
  config: ml_collections.ConfigDict, name: str, stages: tuple, patch: int = 1
) -> ml_collections.ConfigDict:
  """`config` behind a BiT ResNet root with `stages` units per stage."""
  config = _variant(config, name, patches={'size': (patch, patch)})
  config.resnet = ml_collections.ConfigDict(
    {'num_layers': stages, 'width_factor': 1}
  )
  return config


def _mixer(
  name: str,
  patch: int,
  hidden: int,
  blocks: int,
  tokens_mlp: int,
  channels_mlp: int,
) -> ml_collections.ConfigDict:
  """An MLP-Mixer config."""
  return ml_collections.ConfigDict(
    {
      'model_name': name,
      'patches': {'size': (patch, patch)},
      'hidden_dim': hidden,
      'num_blocks': blocks,
      'tokens_mlp_dim': tokens_mlp,
      'channels_mlp_dim': channels_mlp,
    }
  )


# Testing.
##########


@_register()
def get_testing_config() -> ml_collections.ConfigDict:
  """A one-layer width-10 ViT for fast tests."""
  config = _vit('testing', patch=16, hidden=10, mlp=10, heads=2, layers=1)
  config.transformer.dropout_rate = 0.1
  return config


@_register()
def get_testing_unpooled_config() -> ml_collections.ConfigDict:
  """`testing` without a class token, returning logits for every patch."""
  return _variant(
    get_testing_config(), 'testing-unpooled', classifier='unpooled'
  )


# ViT-X/16, ViT-H/14, ViT-B/8 and ViT-X/32.
###########################################


@_register()
def get_ti16_config() -> ml_collections.ConfigDict:
  """ViT-Ti/16."""
  return _vit('ViT-Ti_16', 16, hidden=192, mlp=768, heads=3, layers=12)


@_register()
def get_s16_config() -> ml_collections.ConfigDict:
  """ViT-S/16."""
  return _vit('ViT-S_16', 16, hidden=384, mlp=1536, heads=6, layers=12)


@_register()
def get_b16_config() -> ml_collections.ConfigDict:
  """ViT-B/16."""
  return _vit('ViT-B_16', 16, hidden=768, mlp=3072, heads=12, layers=12)


@_register()
def get_l16_config() -> ml_collections.ConfigDict:
  """ViT-L/16."""
  return _vit(
    'ViT-L_16', 16, hidden=1024, mlp=4096, heads=16, layers=24, dropout=0.1
  )


@_register()
def get_h14_config() -> ml_collections.ConfigDict:
  """ViT-H/14."""
  return _vit(
    'ViT-H_14', 14, hidden=1280, mlp=5120, heads=16, layers=32, dropout=0.1
  )


# big_vision's giant sizes (Zhai et al., "Scaling Vision Transformers",
# 2022), in vit_jax's style: class token, no representation layer.
@_register()
def get_g14_config() -> ml_collections.ConfigDict:
  """ViT-g/14."""
  return _vit('ViT-g_14', 14, hidden=1408, mlp=6144, heads=16, layers=40)


@_register()
def get_G14_config() -> ml_collections.ConfigDict:
  """ViT-G/14."""
  return _vit('ViT-G_14', 14, hidden=1664, mlp=8192, heads=16, layers=48)


@_register()
def get_b8_config() -> ml_collections.ConfigDict:
  """ViT-B/8."""
  return _variant(get_b16_config(), 'ViT-B_8', patches={'size': (8, 8)})


@_register()
def get_s32_config() -> ml_collections.ConfigDict:
  """ViT-S/32."""
  return _variant(get_s16_config(), 'ViT-S_32', patches={'size': (32, 32)})


@_register()
def get_b32_config() -> ml_collections.ConfigDict:
  """ViT-B/32."""
  return _variant(get_b16_config(), 'ViT-B_32', patches={'size': (32, 32)})


@_register()
def get_l32_config() -> ml_collections.ConfigDict:
  """ViT-L/32 (published without dropout)."""
  config = _variant(get_l16_config(), 'ViT-L_32', patches={'size': (32, 32)})
  config.transformer.dropout_rate = 0.0
  return config


# Global-average-pooled variants without pre-logits (AugReg releases).
######################################################################


@_register()
def get_s16_gap_norep_config() -> ml_collections.ConfigDict:
  """ViT-S/16, classifier='gap'."""
  return _variant(get_s16_config(), 'ViT-S_16-gap-norep', classifier='gap')


@_register()
def get_b16_gap_norep_config() -> ml_collections.ConfigDict:
  """ViT-B/16, classifier='gap'."""
  return _variant(get_b16_config(), 'ViT-B_16-gap-norep', classifier='gap')


@_register()
def get_s32_gap_norep_config() -> ml_collections.ConfigDict:
  """ViT-S/32, classifier='gap'."""
  return _variant(get_s32_config(), 'ViT-S_32-gap-norep', classifier='gap')


@_register()
def get_b32_gap_norep_config() -> ml_collections.ConfigDict:
  """ViT-B/32, classifier='gap'."""
  return _variant(get_b32_config(), 'ViT-B_32-gap-norep', classifier='gap')


# Hybrids: a ResNet root downsamples, then 1x1 (or 8x8) "patches".
###################################################################


@_register()
def get_r_ti16_config() -> ml_collections.ConfigDict:
  """ResNet stem only + ViT-Ti with 8x8 patches.

  The stem (stride-2 conv, stride-2 max-pool) downsamples 4x, so each token
  covers 32x32 input pixels (7x7 tokens at 224) despite the published name.
  """
  return _hybrid(get_ti16_config(), 'R+ViT-Ti_16', stages=(), patch=8)


@_register()
def get_r50_b16_config() -> ml_collections.ConfigDict:
  """ResNet-50 root with stages (3, 4, 9): 16x downsampling, + ViT-B."""
  config = _hybrid(get_b16_config(), 'R50+ViT-B_16', stages=(3, 4, 9))
  config.transformer.dropout_rate = 0.1
  return config


@_register()
def get_r26_s32_config() -> ml_collections.ConfigDict:
  """ResNet-26 root (2, 2, 2, 2): 32x downsampling, + ViT-S."""
  return _hybrid(get_s16_config(), 'R26+ViT-S_32', stages=(2, 2, 2, 2))


@_register()
def get_r26_b32_config() -> ml_collections.ConfigDict:
  """ResNet-26 root (2, 2, 2, 2): 32x downsampling, + ViT-B."""
  return _hybrid(get_b32_config(), 'R26+ViT-B_32', stages=(2, 2, 2, 2))


@_register()
def get_r50_l32_config() -> ml_collections.ConfigDict:
  """ResNet-50 root (3, 4, 6, 3): 32x downsampling, + ViT-L."""
  return _hybrid(get_l16_config(), 'R50+ViT-L_32', stages=(3, 4, 6, 3))


# MLP-Mixer.
############


@_register()
def get_mixer_b16_config() -> ml_collections.ConfigDict:
  """Mixer-B/16."""
  return _mixer(
    'Mixer-B_16', 16, hidden=768, blocks=12, tokens_mlp=384, channels_mlp=3072
  )


@_register()
def get_mixer_b32_config() -> ml_collections.ConfigDict:
  """Mixer-B/32."""
  return _mixer(
    'Mixer-B_32', 32, hidden=768, blocks=12, tokens_mlp=384, channels_mlp=3072
  )


@_register()
def get_mixer_l16_config() -> ml_collections.ConfigDict:
  """Mixer-L/16."""
  return _mixer(
    'Mixer-L_16', 16, hidden=1024, blocks=24, tokens_mlp=512, channels_mlp=4096
  )


# Swin Transformer (Liu et al., 2021), window 7 at 224, as timm's
# swin_{tiny,small,base}_patch4_window7_224.
###########################################################################


def _swin(
  name: str,
  embed_dim: int,
  depths: Tuple[int, ...],
  heads: Tuple[int, ...],
  patch: int = 4,
  window: int = 7,
) -> ml_collections.ConfigDict:
  """A Swin config: the keyword arguments of `swin.SwinTransformer`."""
  return ml_collections.ConfigDict(
    {
      'model_name': name,
      'patch_size': patch,
      'embed_dim': embed_dim,
      'depths': depths,
      'num_heads': heads,
      'window_size': window,
      'stochastic_depth': 0.0,
    }
  )


@_register()
def get_swin_t_config() -> ml_collections.ConfigDict:
  """Swin-T: 28,288,354 parameters at 1000 classes."""
  return _swin('Swin-T', 96, (2, 2, 6, 2), (3, 6, 12, 24))


@_register()
def get_swin_s_config() -> ml_collections.ConfigDict:
  """Swin-S: 49,606,258 parameters at 1000 classes."""
  return _swin('Swin-S', 96, (2, 2, 18, 2), (3, 6, 12, 24))


@_register()
def get_swin_b_config() -> ml_collections.ConfigDict:
  """Swin-B: 87,768,224 parameters at 1000 classes."""
  return _swin('Swin-B', 128, (2, 2, 18, 2), (4, 8, 16, 32))


# Small models for 28x28 - 32x32 inputs, trainable from scratch on a CPU.
# They use global average pooling and fixed 2-D sin-cos position embeddings,
# the from-scratch recipe of Beyer et al., "Better plain ViT baselines for
# ImageNet-1k" (2022): both train faster than a class token and learned
# embeddings when there is no pre-training.
###########################################################################


def _small_vit(
  name: str, patch: int, hidden: int, mlp: int, heads: int, layers: int
) -> ml_collections.ConfigDict:
  """A from-scratch ViT: GAP classifier and sincos2d position embeddings."""
  config = _vit(name, patch, hidden=hidden, mlp=mlp, heads=heads, layers=layers)
  config.classifier = 'gap'
  config.posemb = 'sincos2d'
  return config


@_register(resolution=32)
def get_micro4_config() -> ml_collections.ConfigDict:
  """Width 64, 4 layers, patch 4: the smallest ViT that learns MNIST."""
  return _small_vit('ViT-Micro_4', 4, hidden=64, mlp=128, heads=2, layers=4)


@_register(resolution=32)
def get_mini4_config() -> ml_collections.ConfigDict:
  """Width 128, 6 layers, patch 4: 64 tokens at 32x32, 49 at 28x28."""
  return _small_vit('ViT-Mini_4', 4, hidden=128, mlp=512, heads=4, layers=6)


@_register(resolution=28)
def get_mini7_config() -> ml_collections.ConfigDict:
  """Width 128, 6 layers, patch 7: 16 tokens at 28x28 (MNIST)."""
  return _small_vit('ViT-Mini_7', 7, hidden=128, mlp=512, heads=4, layers=6)


@_register(resolution=28)
def get_mini7_mlp256_config() -> ml_collections.ConfigDict:
  """ViT-Mini_7 with an MLP twice (not four times) its width: faster per
  step, so more epochs fit in the few minutes of configs/scratch.py."""
  return _small_vit(
    'ViT-Mini_7-mlp256', 7, hidden=128, mlp=256, heads=4, layers=6
  )


@_register(resolution=28)
def get_mini_c3_config() -> ml_collections.ConfigDict:
  """ViT-Mini_7-mlp256's encoder behind a convolutional stem instead of 7x7
  patches: three 3x3 stride-2 convolutions 16, 32 and 64 wide (ViT_C of Xiao
  et al., "Early convolutions help transformers see better", 2021), then a
  1x1 embedding; the same 4x4 grid of tokens at 28x28. The from-scratch
  recipe of configs/scratch.py:mnist5k."""
  config = _small_vit('ViT-Mini_C3', 1, hidden=128, mlp=256, heads=4, layers=6)
  config.conv_stem = (16, 32, 64)
  return config


@_register(resolution=32)
def get_ti4_config() -> ml_collections.ConfigDict:
  """ViT-Ti dimensions (width 192, 12 layers) with patch 4."""
  return _small_vit('ViT-Ti_4', 4, hidden=192, mlp=768, heads=3, layers=12)


@_register(resolution=28)
def get_swin_mini2_config() -> ml_collections.ConfigDict:
  """Swin for 28x28: patch 2 (a 14x14 grid, 7x7 windows), widths 64 → 128,
  depths (2, 5); about ViT-Mini_7's parameter count."""
  return _swin('Swin-Mini_2', 64, (2, 5), (2, 4), patch=2)


@_register(resolution=28)
def get_swin_mini2_w56_config() -> ml_collections.ConfigDict:
  """Swin-Mini_2 at widths 56 → 112: matches ViT-Mini_C3 (868,426
  parameters vs. 828,554, +4.8%, with 10 classes)."""
  return _swin('Swin-Mini_2-w56', 56, (2, 5), (2, 4), patch=2)


@_register(resolution=32)
def get_mixer_mini4_config() -> ml_collections.ConfigDict:
  """A small Mixer with patch 4: width 128, 6 blocks."""
  return _mixer(
    'Mixer-Mini_4', 4, hidden=128, blocks=6, tokens_mlp=64, channels_mlp=512
  )


# ResNet baselines: BiT-style ResNets (vit_jax's hybrid root under a GAP and
# a linear head) whose parameter counts match ViTs, counted at the ViT's
# resolution and class count: 1000 classes for the ImageNet-sized pair, 10
# for the small pair. As ViT-Ti is ViT-S at half the width, ResNet-Ti is
# ResNet-S at half the width.
############################################################################


def _resnet(
  name: str,
  width: int,
  stages: tuple,
  root: str = 'imagenet',
  num_groups: int = 32,
) -> ml_collections.ConfigDict:
  """A `ResNet` config (bottleneck units, GroupNorm, weight standardisation)."""
  return ml_collections.ConfigDict(
    {
      'model_name': name,
      'width': width,
      'stages': stages,
      'root': root,
      'num_groups': num_groups,
    }
  )


@_register()
def get_resnet_ti_config() -> ml_collections.ConfigDict:
  """Width 32, stages (3, 3, 3, 3): matches ViT-Ti/16.

  6,007,048 parameters vs. ViT-Ti/16's 5,717,416 (+5.1%), at 224 px with
  1000 classes.
  """
  return _resnet('ResNet-Ti', width=32, stages=(3, 3, 3, 3))


@_register()
def get_resnet_s_config() -> ml_collections.ConfigDict:
  """Width 64, stages (3, 3, 3, 3) (a ResNet-38): matches ViT-S/16.

  21,925,416 parameters vs. ViT-S/16's 22,050,664 (-0.6%), at 224 px with
  1000 classes.
  """
  return _resnet('ResNet-S', width=64, stages=(3, 3, 3, 3))


@_register(resolution=32)
def get_resnet_micro_config() -> ml_collections.ConfigDict:
  """Width 16, stages (1, 1, 1), 'small' root: matches ViT-Micro_4.

  Width 16 takes 8 GroupNorm groups (BiT's 32 do not divide it).
  127,642 parameters vs. ViT-Micro_4's 137,802 (-7.4%), at 32 px with 10
  classes.
  """
  return _resnet(
    'ResNet-Micro', width=16, stages=(1, 1, 1), root='small', num_groups=8
  )


@_register(resolution=28)
def get_resnet_mini_config() -> ml_collections.ConfigDict:
  """Width 32, stages (3, 3, 3), 'small' root: matches ViT-Mini_7.

  1,236,522 parameters vs. ViT-Mini_7's 1,210,122 (+2.2%), at 28 px with 10
  classes. At 28 px (MNIST) the two strided stages leave 7x7 features.
  """
  return _resnet('ResNet-Mini', width=32, stages=(3, 3, 3), root='small')


@_register(resolution=28)
def get_resnet_mini_222_config() -> ml_collections.ConfigDict:
  """Width 32, stages (2, 2, 2), 'small' root: matches ViT-Mini_C3.

  868,266 parameters vs. ViT-Mini_C3's 828,554 (+4.8%), at 28 px with 10
  classes.
  """
  return _resnet('ResNet-Mini-222', width=32, stages=(2, 2, 2), root='small')


def get_config(short_name: str) -> ml_collections.ConfigDict:
  """The config of `get_<short_name>_config()`, e.g. 'b16' → ViT-B/16.

  This is how experiment configs name models on the command line
  (`configs/vit.py:b16,cifar10`).
  """
  get_fn = globals().get(f'get_{short_name}_config')
  if get_fn is None or short_name == '':
    known = sorted(
      name[len('get_') : -len('_config')]
      for name in globals()
      if name.startswith('get_') and name.endswith('_config')
    )
    raise ValueError(
      f'Unknown model {short_name!r}; known short names: {", ".join(known)}.'
    )
  return get_fn()
