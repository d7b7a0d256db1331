"""Behaviour of the ViT modules: names, precision, embeddings, options."""

import functools
import subprocess
import sys

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers
from vit_jax import models
from vit_jax.errors import ConfigError
from vit_jax.models import resnet
from vit_jax.models import vit


def param_shapes(model, resolution: int) -> dict:
  images = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)
  variables = jax.eval_shape(
    lambda x: model.init(jax.random.key(0), x, train=False), images
  )
  flat = flax.traverse_util.flatten_dict(variables['params'], sep='/')
  return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def test_vit_b16_tree_matches_vit_jax_names_and_shapes():
  model = models.get_model('ViT-B_16', num_classes=1000)
  # Hidden 768, MLP 3072, 12 heads of 64, 12 layers, 16x16 patches, so
  # (224/16)^2 + 1 = 197 tokens (the paper's Table 1).
  expected = helpers.vit_tree_shapes(
    hidden=768,
    mlp=3072,
    heads=12,
    layers=12,
    patch=16,
    tokens=197,
    num_classes=1000,
  )
  assert param_shapes(model, 224) == expected


def test_representation_size_adds_pre_logits():
  model = models.get_model('ViT-B_16', num_classes=10, representation_size=768)
  shapes = param_shapes(model, 224)
  assert shapes['pre_logits/kernel'] == (768, 768)
  assert shapes['head/kernel'] == (768, 10)


def test_hybrid_root_names_match_vit_jax():
  shapes = param_shapes(models.get_model('R50+ViT-B_16', num_classes=10), 224)
  assert shapes['conv_root/kernel'] == (7, 7, 3, 64)
  assert shapes['gn_root/scale'] == (64,)
  assert shapes['block1/unit1/conv_proj/kernel'] == (1, 1, 64, 256)
  assert shapes['block1/unit1/gn_proj/bias'] == (256,)
  assert shapes['block2/unit1/conv2/kernel'] == (3, 3, 128, 128)
  assert shapes['block3/unit9/conv3/kernel'] == (1, 1, 256, 1024)
  assert 'block4/unit1/conv1/kernel' not in shapes
  assert shapes['embedding/kernel'] == (1, 1, 1024, 768)
  # 224 / 16 = 14 → 196 patch tokens + 1 class token.
  assert shapes['Transformer/posembed_input/pos_embedding'] == (1, 197, 768)


def stem_vit(**options) -> vit.VisionTransformer:
  """A width-16, one-layer ViT that returns every token's logits."""
  return vit.VisionTransformer(
    num_classes=10,
    hidden_size=16,
    transformer={'num_layers': 1, 'mlp_dim': 16, 'num_heads': 2},
    classifier='unpooled',
    posemb='sincos2d',
    **options,
  )


@pytest.mark.parametrize(
  'options, size, grid',
  [
    ({'patches': {'size': (1, 1)}, 'conv_stem': (4, 8, 12)}, 28, (4, 4)),
    ({'patches': {'size': (1, 1)}, 'conv_stem': (4, 8, 12)}, 21, (3, 3)),
    (
      {'patches': {'size': (2, 2), 'padding': 'SAME'}, 'conv_stem': (4, 8)},
      28,
      (4, 4),
    ),
    ({'patches': {'size': (2, 2)}, 'conv_stem': (4, 8)}, 28, (3, 3)),
    ({'patches': {'size': (7, 7)}}, 28, (4, 4)),
  ],
)
def test_conv_stem_token_grid_and_names(options, size, grid):
  """Each stem conv halves the grid (rounding up); `token_grid` predicts the
  tokens the model makes, which attention maps and published files use."""
  model = stem_vit(**options)
  images = jnp.ones((1, size, size, 3))
  logits = model.apply(
    helpers.random_variables(model, images), images, train=False
  )
  assert vit.token_grid((size, size), model.patches, model.conv_stem) == grid
  chex.assert_shape(logits, (1, grid[0] * grid[1], 10))
  shapes = param_shapes(model, size)
  widths = (3, *(options.get('conv_stem') or ()))
  for i, (fan_in, width) in enumerate(zip(widths, widths[1:])):
    assert shapes[f'stem_conv{i}/kernel'] == (3, 3, fan_in, width)
    assert shapes[f'stem_norm{i}/scale'] == (width,)
  assert f'stem_conv{len(widths) - 1}/kernel' not in shapes
  patch = options['patches']['size']
  assert shapes['embedding/kernel'] == (*patch, widths[-1], 16)


@pytest.mark.parametrize(
  'options, size, message',
  [
    ({'patches': {'size': (7, 7)}}, 6, 'Images of 6x6 pixels give a 0x0'),
    (
      {'patches': {'size': (2, 2)}, 'conv_stem': (4, 8)},
      4,
      'Images of 4x4 pixels give a 0x0 token grid through 2 stride-2 '
      'convolutions with 2x2 patches',
    ),
  ],
)
def test_images_without_a_token_are_a_config_error(options, size, message):
  """Rather than a NaN loss at the first step."""
  with pytest.raises(ConfigError, match=message):
    stem_vit(**options).init(
      jax.random.key(0), jnp.ones((1, size, size, 3)), train=False
    )


def test_conv_stem_sees_every_pixel_and_is_trained():
  """A change in the image's last row and column reaches the tokens (SAME
  padding drops nothing), and every stem parameter gets a gradient."""
  model = stem_vit(patches={'size': (1, 1)}, conv_stem=(4, 8, 12))
  images = jax.random.normal(jax.random.key(0), (2, 28, 28, 3))
  variables = helpers.random_variables(model, images)
  corner = images.at[:, -1, -1].add(1.0)
  apply = jax.jit(functools.partial(model.apply, train=False))
  assert not np.allclose(apply(variables, images), apply(variables, corner))
  grads = jax.jit(
    jax.grad(lambda p: (apply({'params': p}, images) ** 2).sum())
  )(variables['params'])
  for name in ('stem_conv0', 'stem_conv1', 'stem_conv2', 'stem_norm2'):
    assert all(
      float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads[name])
    ), name


def test_mixer_names_match_vit_jax():
  shapes = param_shapes(models.get_model('Mixer-B_16', num_classes=10), 224)
  assert shapes['stem/kernel'] == (16, 16, 3, 768)
  assert shapes['MixerBlock_0/token_mixing/Dense_0/kernel'] == (196, 384)
  assert shapes['MixerBlock_11/channel_mixing/Dense_1/kernel'] == (3072, 768)
  assert shapes['MixerBlock_3/LayerNorm_1/scale'] == (768,)
  assert shapes['pre_head_layer_norm/bias'] == (768,)


# Mixed precision.
##################


@pytest.mark.parametrize('name', ['ViT-Mini_4', 'R+ViT-Ti_16', 'Mixer-Mini_4'])
def test_bfloat16_is_close_to_float32_and_params_stay_float32(name):
  resolution = 64 if name.startswith('R+') else 32
  images = jax.random.uniform(
    jax.random.key(0), (4, resolution, resolution, 3), minval=-1, maxval=1
  )
  model32 = models.get_model(name, num_classes=10)
  model16 = models.get_model(name, num_classes=10, dtype=jnp.bfloat16)
  variables = helpers.random_variables(model32, images)

  init16 = jax.eval_shape(
    lambda x: model16.init(jax.random.key(0), x, train=False), images
  )
  assert {leaf.dtype for leaf in jax.tree.leaves(init16)} == {
    jnp.dtype(jnp.float32)
  }

  logits32 = model32.apply(variables, images, train=False)
  logits16, state = model16.apply(
    variables, images, train=False, capture_intermediates=True
  )
  chex.assert_type(logits16, jnp.float32)
  # bf16 keeps 8 significant bits (relative error 2^-8 ≈ 0.4% per rounding);
  # after a whole network the logits agree to a few percent of their scale.
  scale = float(jnp.max(jnp.abs(logits32)))
  chex.assert_trees_all_close(logits16, logits32, atol=0.05 * scale)
  assert float(jnp.max(jnp.abs(logits16 - logits32))) > 0  # bf16 really ran.

  # Every layer computes in bf16 (vit_jax's encoder blocks ignore `dtype`).
  outputs = flax.traverse_util.flatten_dict(state['intermediates'], sep='/')
  # The model's own output is float32.
  inner = {
    path: out[0].dtype for path, out in outputs.items() if path != '__call__'
  }
  assert inner and set(inner.values()) == {jnp.dtype(jnp.bfloat16)}, inner


# Position embeddings.
######################


def test_sincos2d_matches_hand_computed_values():
  table = vit.sincos2d_embedding(height=3, width=4, dim=8)
  chex.assert_shape(table, (12, 8))
  # dim 8 → two frequencies: 1 and 1/10000. Layout per token:
  # [sin(c w), cos(c w), sin(r w), cos(r w)].
  np.testing.assert_allclose(table[0], [0, 0, 1, 1, 0, 0, 1, 1], atol=1e-7)
  row, col = 1, 2  # token 1 * 4 + 2 = 6
  np.testing.assert_allclose(
    table[row * 4 + col],
    [
      np.sin(col),
      np.sin(col * 1e-4),
      np.cos(col),
      np.cos(col * 1e-4),
      np.sin(row),
      np.sin(row * 1e-4),
      np.cos(row),
      np.cos(row * 1e-4),
    ],
    rtol=1e-6,
  )
  np.testing.assert_allclose(
    table[11][:2], [np.sin(3), np.sin(3e-4)], rtol=1e-6
  )


def test_sincos2d_rejects_width_not_multiple_of_4():
  with pytest.raises(ValueError, match='multiple of 4'):
    vit.sincos2d_embedding(2, 2, 10)


def test_sincos2d_is_added_and_not_trainable():
  encoder = vit.Encoder(
    num_layers=0, mlp_dim=8, num_heads=2, posemb='sincos2d', posemb_grid=(2, 3)
  )
  tokens = jnp.zeros((1, 7, 8))  # A class token + a 2x3 grid.
  variables = encoder.init(jax.random.key(0), tokens, train=False)
  assert set(variables['params']) == {'encoder_norm'}
  out = encoder.apply(variables, tokens, train=False)
  table = np.concatenate([np.zeros((1, 8)), vit.sincos2d_embedding(2, 3, 8)])
  mean = table.mean(-1, keepdims=True)
  expected = (table - mean) / np.sqrt(table.var(-1, keepdims=True) + 1e-6)
  chex.assert_trees_all_close(out[0], expected, atol=1e-5)


def test_model_with_sincos2d_has_no_position_parameter():
  model = models.get_model('ViT-B_16', num_classes=10, posemb='sincos2d')
  shapes = param_shapes(model, 224)
  assert not any('posembed' in path for path in shapes)


def test_no_position_embedding():
  model = models.get_model('testing', num_classes=10, posemb='none')
  assert not any('posembed' in path for path in param_shapes(model, 32))


# Classifiers, dropout, attention weights.
##########################################


def test_classifiers_pool_the_same_tokens():
  """'token_unpooled' is 'token' plus the patch tokens; the head is linear,
  so the mean of 'unpooled' logits is the 'gap' logits."""
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  logits = {}
  for classifier in ('token', 'token_unpooled', 'gap', 'unpooled'):
    model = models.get_model('testing', num_classes=5, classifier=classifier)
    if classifier in ('token', 'gap'):
      variables = helpers.random_variables(model, images)
    assert ('cls' in variables['params']) == classifier.startswith('token')
    logits[classifier] = model.apply(variables, images, train=False)

  chex.assert_shape([logits['token'], logits['gap']], (2, 5))
  chex.assert_shape(logits['token_unpooled'], (2, 5, 5))
  chex.assert_shape(logits['unpooled'], (2, 4, 5))
  chex.assert_trees_all_close(
    logits['token_unpooled'][:, 0], logits['token'], atol=1e-5
  )
  chex.assert_trees_all_close(
    logits['unpooled'].mean(1), logits['gap'], atol=1e-5
  )


def test_invalid_classifier_is_rejected():
  model = models.get_model('testing', num_classes=5, classifier='tokn')
  with pytest.raises(ValueError, match="classifier='tokn'"):
    model.init(jax.random.key(0), jnp.ones((1, 32, 32, 3)), train=False)


def test_dropout_only_in_training():
  model = models.get_model('testing', num_classes=5)  # dropout_rate 0.1
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = helpers.random_variables(model, images)
  apply = lambda train, seed: model.apply(
    variables, images, train=train, rngs={'dropout': jax.random.key(seed)}
  )
  chex.assert_trees_all_equal(apply(False, 0), apply(False, 1))
  assert not np.allclose(apply(True, 0), apply(True, 1))


def test_sown_attention_weights_leave_output_unchanged():
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  plain = models.get_model('ViT-Micro_4', num_classes=5)
  sowing = models.get_model(
    'ViT-Micro_4', num_classes=5, sow_attention_weights=True
  )
  variables = helpers.random_variables(plain, images)

  logits, state = sowing.apply(
    variables, images, train=False, mutable=['intermediates']
  )
  chex.assert_trees_all_close(
    logits, plain.apply(variables, images, train=False), atol=1e-6
  )
  _, plain_state = plain.apply(
    variables, images, train=False, mutable=['intermediates']
  )
  assert not plain_state

  weights = state['intermediates']['Transformer']
  assert len(weights) == 4  # One per layer.
  attention = weights['encoderblock_0']['MultiHeadDotProductAttention_0'][
    'attention_weights'
  ][0]
  chex.assert_shape(attention, (2, 2, 64, 64))  # batch, heads, query, key
  chex.assert_trees_all_close(
    attention.sum(-1), jnp.ones((2, 2, 64)), atol=1e-5
  )


# Attention.
###########


def _attention_inputs():
  x = jax.random.normal(jax.random.key(0), (2, 9, 16))
  return x, jax.random.normal(jax.random.key(1), x.shape)


def test_attention_equals_flax_multi_head_attention():
  """Same parameter tree, initial values, outputs and gradients as
  nn.MultiHeadDotProductAttention (vit_jax's), in both the inference
  (dot_product_attention) and the training path."""
  x, cotangent = _attention_inputs()
  ours = vit.MultiHeadSelfAttention(num_heads=4)
  flax_mha = nn.MultiHeadDotProductAttention(
    num_heads=4, kernel_init=nn.initializers.xavier_uniform()
  )
  params = ours.init(jax.random.key(2), x, deterministic=True)
  chex.assert_trees_all_equal(params, flax_mha.init(jax.random.key(2), x, x))
  params = jax.tree.map(  # Non-zero biases.
    lambda p: p + 0.1 * jax.random.normal(jax.random.key(3), p.shape), params
  )

  want = flax_mha.apply(params, x, x)
  for deterministic in (True, False):
    chex.assert_trees_all_close(
      ours.apply(params, x, deterministic=deterministic), want, atol=1e-5
    )
  grad = lambda f: jax.grad(lambda p: (f(p) * cotangent).sum())(params)
  chex.assert_trees_all_close(
    grad(lambda p: ours.apply(p, x, deterministic=False)),
    grad(lambda p: flax_mha.apply(p, x, x)),
    atol=1e-5,
  )


def test_attention_width_not_divisible_by_heads_is_an_error():
  with pytest.raises(ValueError, match='Width 16 .* 5 attention heads'):
    vit.MultiHeadSelfAttention(num_heads=5).init(
      jax.random.key(0), jnp.ones((1, 3, 16)), deterministic=True
    )


# Hybrid root.
##############


def test_std_conv_standardises_its_kernel():
  conv = resnet.StdConv(features=4, kernel_size=(3, 3))
  x = jax.random.normal(jax.random.key(0), (1, 5, 5, 2))
  kernel = 3.0 + 2.0 * jax.random.normal(jax.random.key(1), (3, 3, 2, 4))
  out = conv.apply({'params': {'kernel': kernel}}, x)

  k = np.asarray(kernel, np.float64)
  k = (k - k.mean((0, 1, 2))) / (k.std((0, 1, 2)) + 1e-5)
  expected = jax.lax.conv_general_dilated(
    x,
    jnp.asarray(k, jnp.float32),
    (1, 1),
    'SAME',
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  )
  chex.assert_trees_all_close(out, expected, atol=1e-4)


@pytest.mark.parametrize('strides', [(1, 1), (2, 2)])
def test_std_conv_1x1_matmul_equals_the_convolution(strides):
  conv = resnet.StdConv(features=6, kernel_size=(1, 1), strides=strides)
  x = jax.random.normal(jax.random.key(0), (2, 7, 7, 5))
  kernel = jax.random.normal(jax.random.key(1), (1, 1, 5, 6))
  out = conv.apply({'params': {'kernel': kernel}}, x)

  standardised = resnet.weight_standardize(kernel, axis=(0, 1, 2), eps=1e-5)
  expected = jax.lax.conv_general_dilated(
    x, standardised, strides, 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )
  chex.assert_shape(out, expected.shape)
  chex.assert_trees_all_close(out, expected, atol=1e-5)


def test_group_norm_equals_flax_values_and_gradients():
  x = 2.0 + 3.0 * jax.random.normal(jax.random.key(0), (2, 5, 6, 16))
  params = {
    'scale': jax.random.normal(jax.random.key(1), (16,)),
    'bias': jax.random.normal(jax.random.key(2), (16,)),
  }
  ours = lambda p, x: resnet.GroupNorm(num_groups=4).apply({'params': p}, x)
  flax_gn = lambda p, x: nn.GroupNorm(num_groups=4).apply({'params': p}, x)

  chex.assert_trees_all_close(ours(params, x), flax_gn(params, x), atol=1e-5)
  weights = jax.random.normal(jax.random.key(3), x.shape)
  grad = lambda f: jax.grad(
    lambda p, x: (f(p, x) * weights).sum(), argnums=(0, 1)
  )(params, x)
  chex.assert_trees_all_close(grad(ours), grad(flax_gn), atol=1e-4)


def test_group_norm_that_does_not_divide_the_channels_is_an_error():
  with pytest.raises(ValueError, match=r"'gn1'.*num_groups=3.*16 channels"):
    resnet.GroupNorm(num_groups=3, name='gn1').init(
      jax.random.key(0), jnp.ones((1, 2, 2, 16))
    )


@pytest.mark.parametrize(
  'padding,size', [('VALID', 16), ('VALID', 18), ('SAME', 16), ('SAME', 19)]
)
def test_patch_embedding_equals_the_strided_conv(padding, size):
  """Same parameters, initial values, outputs and gradients as nn.Conv."""
  x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
  ours = vit.PatchEmbedding(5, (4, 4), padding=padding)
  conv = nn.Conv(5, (4, 4), strides=(4, 4), padding=padding)
  params = ours.init(jax.random.key(1), x)
  chex.assert_trees_all_equal(params, conv.init(jax.random.key(1), x))
  params = jax.tree.map(
    lambda p: p + jax.random.normal(jax.random.key(2), p.shape), params
  )

  chex.assert_trees_all_close(
    ours.apply(params, x), conv.apply(params, x), atol=1e-5
  )
  grad = lambda m: jax.grad(lambda p: (m.apply(p, x) ** 2).sum())(params)
  chex.assert_trees_all_close(grad(ours), grad(conv), rtol=1e-5, atol=1e-4)


def test_wrong_input_rank_is_a_clear_error():
  model = models.get_model('testing', num_classes=5)
  with pytest.raises(ValueError, match=r'\[batch, height, width, channels\]'):
    model.init(jax.random.key(0), jnp.ones((32, 32, 3)), train=False)


# Model table.
##############


def test_model_table_cli():
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'vit_jax.models',
      '--table',
      '--models',
      'ViT-B_16',
      'testing',
    ],
    capture_output=True,
    text=True,
    check=True,
  )
  lines = result.stdout.strip().splitlines()
  assert lines[0].startswith('| model | resolution | parameters')
  assert '| ViT-B_16 | 224 | 86,567,656 |' in result.stdout
  assert '| testing | 224 | 21,390 |' in result.stdout


def test_gelu_and_layernorm_options_change_the_function():
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  base = models.get_model('ViT-Micro_4', num_classes=5)
  variables = helpers.random_variables(base, images)
  reference = base.apply(variables, images, train=False)
  for option in ({'approximate_gelu': False}, {'layernorm_epsilon': 1e-12}):
    model = models.get_model('ViT-Micro_4', num_classes=5, **option)
    logits = model.apply(variables, images, train=False)
    assert not np.array_equal(logits, reference), option
    chex.assert_trees_all_close(logits, reference, atol=0.05)


def test_mlp_block_exact_gelu_matches_erf_formula():
  x = jnp.linspace(-3, 3, 16).reshape(1, 16)
  block = vit.MlpBlock(mlp_dim=16, approximate_gelu=False, dropout_rate=0.0)
  eye = {
    'params': {
      'Dense_0': {'kernel': jnp.eye(16), 'bias': jnp.zeros(16)},
      'Dense_1': {'kernel': jnp.eye(16), 'bias': jnp.zeros(16)},
    }
  }
  out = block.apply(eye, x, deterministic=True)
  expected = 0.5 * x * (1 + jax.scipy.special.erf(x / np.sqrt(2)))
  chex.assert_trees_all_close(out, expected, atol=1e-6)


@pytest.mark.parametrize('shape', [(2, 5, 8), (2, 3, 4, 8)])
def test_mlp_block_on_rows_equals_the_per_position_formula(shape):
  """The block computes on rows (`as_rows`); its output and gradients are
  those of gelu(x W0 + b0) W1 + b1 at every position of a 3-D or 4-D
  input (a ViT's tokens, a Swin's windows)."""
  x = jax.random.normal(jax.random.key(0), shape)
  block = vit.MlpBlock(mlp_dim=12, out_dim=6, dropout_rate=0.0)
  params = block.init(jax.random.key(1), x, deterministic=True)
  params = jax.tree.map(  # Non-zero biases.
    lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params
  )

  def formula(variables):
    dense_0, dense_1 = (variables['params'][f'Dense_{i}'] for i in (0, 1))
    hidden = jnp.einsum('...d,df->...f', x, dense_0['kernel'])
    hidden = jax.nn.gelu(hidden + dense_0['bias'], approximate=True)
    return (
      jnp.einsum('...f,fo->...o', hidden, dense_1['kernel']) + dense_1['bias']
    )

  ours = lambda variables: block.apply(variables, x, deterministic=True)
  chex.assert_shape(ours(params), shape[:-1] + (6,))
  chex.assert_trees_all_close(ours(params), formula(params), atol=1e-5)
  cotangent = jax.random.normal(jax.random.key(3), shape[:-1] + (6,))
  grad = lambda f: jax.grad(lambda p: (f(p) * cotangent).sum())(params)
  chex.assert_trees_all_close(grad(ours), grad(formula), atol=1e-5)
