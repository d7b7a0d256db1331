"""Every registered model's exact size; jit == no-jit for one per family;
the shared MLP head on every model class."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from tests import helpers
from vit_jax import finetune
from vit_jax import models
from vit_jax.models import heads as heads_lib
from vit_jax.models import table

# Published by vit_jax (models_test.py), 1000 classes at 224x224.
VIT_JAX_SIZES = {
  'Mixer-B_16': 59_880_472,
  'Mixer-B_32': 60_293_428,
  'Mixer-L_16': 208_196_168,
  'R+ViT-Ti_16': 6_337_704,
  'R26+ViT-B_32': 101_383_976,
  'R26+ViT-S_32': 36_431_912,
  'R50+ViT-B_16': 98_659_112,
  'R50+ViT-L_32': 328_994_856,
  'ViT-B_8': 86_576_872,
  'ViT-B_16': 86_567_656,
  'ViT-B_16-gap-norep': 86_566_120,
  'ViT-B_32': 88_224_232,
  'ViT-B_32-gap-norep': 88_222_696,
  'ViT-H_14': 632_045_800,
  'ViT-L_16': 304_326_632,
  'ViT-L_32': 306_535_400,
  'ViT-S_16': 22_050_664,
  'ViT-S_16-gap-norep': 22_049_896,
  'ViT-S_32': 22_878_952,
  'ViT-S_32-gap-norep': 22_878_184,
  'ViT-Ti_16': 5_717_416,
  'testing': 21_390,
  'testing-unpooled': 21_370,
}


def resnet_size(width: int, stages, root: str, num_classes: int) -> int:
  """Parameters of a BiT bottleneck ResNet (GroupNorm, bias-free convs)."""
  kernel = 7 if root == 'imagenet' else 3
  total, channels = kernel * kernel * 3 * width + 2 * width, width
  for stage, units in enumerate(stages):
    f = width * 2**stage
    for unit in range(units):
      # 1x1 in, 3x3, 1x1 out to 4f; GroupNorms of f, f and 4f channels.
      total += channels * f + 9 * f * f + f * 4 * f + 2 * (f + f + 4 * f)
      if unit == 0:  # Projected shortcut.
        total += channels * 4 * f + 2 * 4 * f
      channels = 4 * f
  return total + channels * num_classes + num_classes


def swin_size(config, num_classes: int) -> int:
  """Parameters of a Swin Transformer (Liu et al.): per block two
  LayerNorms, qkv and projection with biases, an MLP of 4x width and a
  relative position bias table of (2w - 1)² rows per head; a patch merge
  normalises 4C channels and projects them to 2C without bias."""
  c, p, w = config.embed_dim, config.patch_size, config.window_size
  total = p * p * 3 * c + c + 2 * c
  for stage, (depth, heads) in enumerate(zip(config.depths, config.num_heads)):
    if stage:
      total += 2 * 4 * c + 4 * c * 2 * c
      c *= 2
    block = 2 * c + 3 * c * c + 3 * c + c * c + c + 2 * c
    block += c * 4 * c + 4 * c + 4 * c * c + c + (2 * w - 1) ** 2 * heads
    total += depth * block
  return total + 2 * c + c * num_classes + num_classes


def closed_form_size(name: str, resolution: int, num_classes: int) -> int:
  """Parameter count from the architecture's dimensions alone.

  Written from the papers' definitions, independently of the model code, for
  the plain (non-hybrid) ViTs, with or without a convolutional stem, Mixers,
  ResNets and Swins.
  """
  config = models.MODEL_CONFIGS[name]
  if name.startswith('ResNet-'):
    return resnet_size(config.width, config.stages, config.root, num_classes)
  if name.startswith('Swin-'):
    return swin_size(config, num_classes)
  patch = config.patches.size[0]
  size = resolution
  for _ in config.get('conv_stem', ()):  # 'SAME' stride 2: rounds up.
    size = (size + 1) // 2
  tokens = (size // patch) ** 2
  if name.startswith('Mixer-'):
    d, t, c = config.hidden_dim, config.tokens_mlp_dim, config.channels_mlp_dim
    block = (
      4 * d + (tokens * t + t + t * tokens + tokens) + (d * c + c + c * d + d)
    )
    return (
      patch * patch * 3 * d
      + d
      + config.num_blocks * block
      + 2 * d
      + d * num_classes
      + num_classes
    )
  d, m = config.hidden_size, config.transformer.mlp_dim
  cls = config.classifier in ('token', 'token_unpooled')
  layer = 4 * d + 4 * (d * d + d) + (d * m + m + m * d + d)
  posemb = (
    (tokens + cls) * d if config.get('posemb', 'learned') == 'learned' else 0
  )
  # A 3x3 conv (kernel, bias) and a LayerNorm (scale, bias) per stem layer.
  widths = (3, *config.get('conv_stem', ()))
  stem = sum(9 * a * b + 3 * b for a, b in zip(widths, widths[1:]))
  return (
    stem
    + patch * patch * widths[-1] * d
    + d
    + cls * d
    + posemb
    + config.transformer.num_layers * layer
    + 2 * d
    + d * num_classes
    + num_classes
  )


# big_vision's giant ViTs, registered in vit_jax's style (class token, no
# representation layer), with a 1000-class head at 224 px.
BIG_VISION_SIZES = {'ViT-g_14': 1_012_611_432, 'ViT-G_14': 1_844_440_680}


@pytest.mark.parametrize('name, size', sorted(BIG_VISION_SIZES.items()))
def test_giant_vits_have_big_visions_sizes(name, size):
  model = models.get_model(name, num_classes=1000)
  variables = table.abstract_variables(model, 224)
  assert table.count_params(variables) == size


def test_every_vit_jax_model_is_registered():
  assert set(VIT_JAX_SIZES) <= set(models.MODEL_CONFIGS)


@pytest.mark.parametrize('name', sorted(models.MODEL_CONFIGS))
def test_parameter_count_is_exact(name):
  resolution = models.DEFAULT_RESOLUTIONS[name]
  model = models.get_model(name, num_classes=1000)
  count = table.count_params(table.abstract_variables(model, resolution))
  if name in VIT_JAX_SIZES:
    assert count == VIT_JAX_SIZES[name]
  if '+' not in name:  # Hybrids: the published count is the reference.
    assert count == closed_form_size(name, resolution, 1000)


def test_closed_form_agrees_with_published_counts():
  for name, size in VIT_JAX_SIZES.items():
    if '+' not in name:
      assert closed_form_size(name, 224, 1000) == size, name


def test_vit_b16_count_printed_by_model_table():
  stats = table.model_stats('ViT-B_16')
  assert stats.params == 86_567_656
  # 17.6 G multiply-adds, the figure papers quote as "FLOPs".
  assert 34.5 < stats.gflops < 36.0


def small_resolution(name: str) -> int:
  """Two tokens (or final feature pixels) per side: the cheapest input every
  layer accepts."""
  config = models.MODEL_CONFIGS[name]
  if name.startswith('ResNet-'):
    root_stride = 4 if config.root == 'imagenet' else 1
    return 2 * root_stride * 2 ** (len(config.stages) - 1)
  if name.startswith('Swin-'):  # Every stage's grid splits into windows.
    return models.DEFAULT_RESOLUTIONS[name]
  stride = config.patches.size[0]
  if 'resnet' in config:
    stride *= 4 * 2 ** max(len(config.resnet.num_layers) - 1, 0)
  return 2 * stride


# One model of each family that jit could compile differently: plain
# attention, shifted-window attention with masks, and convolutions.
@pytest.mark.parametrize('name', ['ViT-Ti_16', 'Swin-Mini_2', 'ResNet-Mini'])
def test_jit_output_equals_eager_output(name):
  resolution = small_resolution(name)
  model = models.get_model(name, num_classes=7)
  images = jax.random.uniform(
    jax.random.key(1), (2, resolution, resolution, 3), minval=-1, maxval=1
  )
  variables = helpers.random_variables(model, images)

  def forward(variables, images):
    return model.apply(variables, images, train=False)

  logits = jax.jit(forward)(variables, images)

  chex.assert_shape(logits, (2, 7))
  chex.assert_type(logits, jnp.float32)
  chex.assert_tree_all_finite(logits)
  assert float(jnp.std(logits)) > 0.1
  chex.assert_trees_all_close(
    logits, forward(variables, images), rtol=1e-4, atol=1e-4
  )


# The smallest registered model of each model class.
ONE_PER_CLASS = ('ViT-Micro_4', 'Mixer-Mini_4', 'Swin-Mini_2', 'ResNet-Micro')


def test_one_per_class_covers_every_model_class():
  assert {models.model_class(n) for n in ONE_PER_CLASS} == {
    models.model_class(n) for n in models.MODEL_CONFIGS
  }


@pytest.mark.parametrize('name', ONE_PER_CLASS)
def test_every_model_class_takes_the_mlp_head(name):
  """`config.finetune.head.type='mlp'` builds `head/{hidden,out}` on every
  model class, and the model's logits are that head's on its features."""
  config = common.get_config()
  config.model = models.MODEL_CONFIGS[name]
  config.finetune.head.update({'type': 'mlp', 'mlp_dim': 8})
  model = finetune.build_model(config, 7)
  resolution = small_resolution(name)
  images = jax.random.uniform(
    jax.random.key(2), (2, resolution, resolution, 3), minval=-1, maxval=1
  )
  params = helpers.random_variables(model, images)['params']
  features = heads_lib.head_inputs(model, params, images)
  width = features.shape[-1]
  chex.assert_trees_all_equal_shapes(
    params['head'],
    {
      'hidden': {'kernel': np.zeros((width, 8)), 'bias': np.zeros(8)},
      'out': {'kernel': np.zeros((8, 7)), 'bias': np.zeros(7)},
    },
  )
  chex.assert_trees_all_close(
    heads_lib.Head.of(model).apply({'params': params}, features, train=False),
    model.apply({'params': params}, images, train=False),
    atol=1e-5,
  )


def test_b16_runs_a_224_batch():
  model = models.get_model('ViT-B_16', num_classes=1000)
  images = jnp.ones((2, 224, 224, 3))
  variables = model.init(jax.random.key(0), images, train=False)
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(
    variables, images
  )
  chex.assert_shape(logits, (2, 1000))
  chex.assert_tree_all_finite(logits)
  np.testing.assert_array_equal(logits, 0.0)  # Zero-initialised head.


def test_unknown_model_name_lists_registered_names():
  with pytest.raises(KeyError, match='ViT-B_16'):
    models.get_model('ViT-B_61', num_classes=10)


def test_unknown_option_is_named():
  with pytest.raises(TypeError, match='hidden_sise'):
    models.get_model('ViT-B_16', num_classes=10, hidden_sise=3)


def test_overrides_take_precedence_over_registry():
  model = models.get_model('ViT-B_16', num_classes=10, classifier='gap')
  assert model.classifier == 'gap'
  assert models.MODEL_CONFIGS['ViT-B_16'].classifier == 'token'
