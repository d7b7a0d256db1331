"""PyTorch ViT state dicts: timm and HF transformers names in, timm out, files.

The key tests build state dicts from architecture dimensions and check that
the imported parameters compute what the source library computes, written
out below in NumPy (float64) from the libraries' module structure.
"""

import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from tests import helpers
from vit_jax import models
from vit_jax.checkpoint import files
from vit_jax.checkpoint import torch_names
from vit_jax.errors import CheckpointError
from vit_jax.models import vit

# A tiny ViT: hidden 32, 4 heads of 8, MLP 64, 2 layers, 4x4 patches of 32x32
# images (an 8x8 grid of 64 patch tokens), 5 classes.
D, HEADS, MLP, LAYERS, PATCH, RESOLUTION, CLASSES = 32, 4, 64, 2, 4, 32, 5
PATCH_TOKENS = (RESOLUTION // PATCH) ** 2


def timm_shapes(
  d=D,
  mlp=MLP,
  layers=LAYERS,
  patch=PATCH,
  tokens=PATCH_TOKENS,
  classes=CLASSES,
  cls_token=True,
):
  """Tensor shapes of a timm `VisionTransformer` state dict (no head: 0)."""
  shapes = {
    'patch_embed.proj.weight': (d, 3, patch, patch),
    'patch_embed.proj.bias': (d,),
    'pos_embed': (1, tokens + cls_token, d),
    'norm.weight': (d,),
    'norm.bias': (d,),
  }
  if cls_token:
    shapes['cls_token'] = (1, 1, d)
  if classes:
    shapes.update({'head.weight': (classes, d), 'head.bias': (classes,)})
  for i in range(layers):
    for name, weight in (
      ('norm1', (d,)),
      ('attn.qkv', (3 * d, d)),
      ('attn.proj', (d, d)),
      ('norm2', (d,)),
      ('mlp.fc1', (mlp, d)),
      ('mlp.fc2', (d, mlp)),
    ):
      shapes[f'blocks.{i}.{name}.weight'] = weight
      shapes[f'blocks.{i}.{name}.bias'] = weight[:1]
  return shapes


def hf_shapes(prefix='vit.', classifier=True, pooler=False):
  """Tensor shapes of an HF `ViTForImageClassification` / `ViTModel`."""
  shapes = {
    'embeddings.patch_embeddings.projection.weight': (D, 3, PATCH, PATCH),
    'embeddings.patch_embeddings.projection.bias': (D,),
    'embeddings.cls_token': (1, 1, D),
    'embeddings.position_embeddings': (1, PATCH_TOKENS + 1, D),
    'layernorm.weight': (D,),
    'layernorm.bias': (D,),
  }
  if pooler:
    shapes.update({'pooler.dense.weight': (D, D), 'pooler.dense.bias': (D,)})
  for i in range(LAYERS):
    layer = f'encoder.layer.{i}.'
    for name, weight in (
      ('layernorm_before', (D,)),
      ('attention.attention.query', (D, D)),
      ('attention.attention.key', (D, D)),
      ('attention.attention.value', (D, D)),
      ('attention.output.dense', (D, D)),
      ('layernorm_after', (D,)),
      ('intermediate.dense', (MLP, D)),
      ('output.dense', (D, MLP)),
    ):
      shapes[f'{layer}{name}.weight'] = weight
      shapes[f'{layer}{name}.bias'] = weight[:1]
  shapes = {prefix + key: shape for key, shape in shapes.items()}
  if classifier:
    shapes.update(
      {'classifier.weight': (CLASSES, D), 'classifier.bias': (CLASSES,)}
    )
  return shapes


def random_state(shapes, seed=0):
  """Float32 tensors of `shapes`, scaled so activations stay O(1).

  Linear and conv weights are N(0, 1/fan_in), LayerNorm weights near 1,
  biases and embeddings N(0, 0.25).
  """
  rng = np.random.default_rng(seed)
  state = {}
  for key, shape in shapes.items():
    noise = rng.standard_normal(shape, np.float32)
    if key.endswith('.weight') and len(shape) > 1:
      state[key] = noise / math.sqrt(math.prod(shape[1:]))
    elif key.endswith('.weight'):
      state[key] = 1 + 0.1 * noise
    else:
      state[key] = 0.5 * noise
  return state


def random_images(seed=0):
  rng = np.random.default_rng(seed)
  return rng.standard_normal((2, RESOLUTION, RESOLUTION, 3), np.float32)


# NumPy references of the sources' forward passes (eval mode).
##############################################################


def _linear(x, state, name):
  """torch.nn.Linear: weight is (out, in)."""
  return x @ state[name + '.weight'].T + state[name + '.bias']


def _layer_norm(x, state, name, epsilon):
  mean = x.mean(-1, keepdims=True)
  normed = (x - mean) / np.sqrt(x.var(-1, keepdims=True) + epsilon)
  return normed * state[name + '.weight'] + state[name + '.bias']


def _gelu(x):
  """Exact GELU, torch.nn.GELU()'s default."""
  return 0.5 * x * (1 + special.erf(x / np.sqrt(2)))


def _patch_embed(images, state, name):
  """torch Conv2d(3, D, p, stride=p) on NHWC images; tokens row by row."""
  weight = state[name + '.weight']  # (D, 3, p, p), OIHW.
  n, height, width, channels = images.shape
  p = weight.shape[-1]
  patches = images.reshape(n, height // p, p, width // p, p, channels)
  patches = patches.transpose(0, 1, 3, 5, 2, 4)  # n, row, column, c, i, j.
  patches = patches.reshape(n, -1, channels * p * p)
  return patches @ weight.reshape(len(weight), -1).T + state[name + '.bias']


def _attention(q, k, v):
  """Softmax attention of [n, heads, tokens, head_dim]; heads concatenated."""
  logits = q @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1])
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  n, heads, tokens, head_dim = q.shape
  return (
    (weights @ v).transpose(0, 2, 1, 3).reshape(n, tokens, heads * head_dim)
  )


def _prepend(x, token):
  return np.concatenate([np.broadcast_to(token, (len(x), 1, D)), x], axis=1)


def timm_forward(state, images):
  """timm's VisionTransformer: fused qkv, eps 1e-6, 'token' or 'avg' pool."""
  s = {key: value.astype(np.float64) for key, value in state.items()}
  x = _patch_embed(images.astype(np.float64), s, 'patch_embed.proj')
  if 'cls_token' in s:
    x = _prepend(x, s['cls_token'])
  x = x + s['pos_embed']
  for i in range(LAYERS):
    block = f'blocks.{i}.'
    qkv = _linear(
      _layer_norm(x, s, block + 'norm1', 1e-6), s, block + 'attn.qkv'
    )
    n, tokens, _ = qkv.shape
    q, k, v = qkv.reshape(n, tokens, 3, HEADS, -1).transpose(2, 0, 3, 1, 4)
    x = x + _linear(_attention(q, k, v), s, block + 'attn.proj')
    y = _layer_norm(x, s, block + 'norm2', 1e-6)
    x = x + _linear(
      _gelu(_linear(y, s, block + 'mlp.fc1')), s, block + 'mlp.fc2'
    )
  x = _layer_norm(x, s, 'norm', 1e-6)
  x = x[:, 0] if 'cls_token' in s else x.mean(axis=1)
  return _linear(x, s, 'head') if 'head.weight' in s else x


def hf_forward(state, images, epsilon=1e-12):
  """HF ViTForImageClassification's logits, else ViTModel's pooler_output."""
  s = {
    key.removeprefix('vit.'): value.astype(np.float64)
    for key, value in state.items()
  }
  x = _patch_embed(
    images.astype(np.float64), s, 'embeddings.patch_embeddings.projection'
  )
  x = (
    _prepend(x, s['embeddings.cls_token']) + s['embeddings.position_embeddings']
  )
  for i in range(LAYERS):
    layer = f'encoder.layer.{i}.'
    y = _layer_norm(x, s, layer + 'layernorm_before', epsilon)
    n, tokens, _ = y.shape
    q, k, v = (
      _linear(y, s, f'{layer}attention.attention.{name}')
      .reshape(n, tokens, HEADS, -1)
      .transpose(0, 2, 1, 3)
      for name in ('query', 'key', 'value')
    )
    x = x + _linear(_attention(q, k, v), s, layer + 'attention.output.dense')
    y = _layer_norm(x, s, layer + 'layernorm_after', epsilon)
    x = x + _linear(
      _gelu(_linear(y, s, layer + 'intermediate.dense')),
      s,
      layer + 'output.dense',
    )
  x = _layer_norm(x, s, 'layernorm', epsilon)[:, 0]
  if 'classifier.weight' in s:
    return _linear(x, s, 'classifier')
  return np.tanh(_linear(x, s, 'pooler.dense'))


def apply_imported(params, info, images, **overrides):
  model = vit.VisionTransformer(**{**info, **overrides})
  return model.apply({'params': params}, jnp.asarray(images), train=False)


# Format detection.
###################


@pytest.mark.parametrize(
  'shapes, expected',
  [
    (timm_shapes(), 'timm'),
    (timm_shapes(cls_token=False, classes=0), 'timm'),
    (hf_shapes(), 'hf'),
    (hf_shapes(prefix='', classifier=False, pooler=True), 'hf'),
    ({'conv1.weight': (8, 3, 3, 3), 'fc.weight': (10, 8)}, None),
    ({}, None),
  ],
)
def test_detect(shapes, expected):
  state = {key: np.zeros(shape, np.float32) for key, shape in shapes.items()}
  assert torch_names.detect(state) == expected


# Imports compute their source's function.
##########################################


@pytest.mark.parametrize(
  'cls_token, classes, classifier',
  [
    (True, CLASSES, 'token'),  # timm's default global_pool='token'.
    (False, CLASSES, 'gap'),  # class_token=False, 'avg', fc_norm=False.
    (True, 0, 'token'),  # num_classes=0: features, no head.
  ],
)
def test_timm_import_computes_timm_forward(cls_token, classes, classifier):
  state = random_state(timm_shapes(cls_token=cls_token, classes=classes))
  images = random_images()
  params, info = torch_names.from_timm(state, num_heads=HEADS)
  assert info['classifier'] == classifier
  assert info['num_classes'] == classes
  assert info['representation_size'] is None
  assert not info['approximate_gelu']
  assert info['layernorm_epsilon'] == 1e-6
  assert ('cls' in params) == cls_token
  expected = timm_forward(state, images)
  chex.assert_trees_all_close(
    apply_imported(params, info, images), expected, atol=1e-4
  )
  if classes and cls_token:
    # The tolerance is fine enough to tell the GELU flavours apart.
    tanh_gelu = apply_imported(params, info, images, approximate_gelu=True)
    assert np.abs(tanh_gelu - expected).max() > 1e-4


@pytest.mark.parametrize(
  'prefix, classifier, pooler',
  [
    ('vit.', True, False),  # ViTForImageClassification.
    ('', False, True),  # ViTModel: pooler_output becomes our output.
    ('vit.', True, True),  # The classifier does not read the pooler.
  ],
)
def test_hf_import_computes_hf_forward(prefix, classifier, pooler):
  state = random_state(hf_shapes(prefix, classifier, pooler))
  images = random_images()
  params, info = torch_names.from_hf(state, num_heads=HEADS)
  assert info['classifier'] == 'token'
  assert info['layernorm_epsilon'] == 1e-12
  assert not info['approximate_gelu']
  assert info['num_classes'] == (CLASSES if classifier else 0)
  assert info['representation_size'] == (None if classifier else D)
  assert ('pre_logits' in params) == (not classifier)
  chex.assert_trees_all_close(
    apply_imported(params, info, images), hf_forward(state, images), atol=1e-4
  )


def test_hf_mask_token_is_dropped():
  state = random_state({**hf_shapes(), 'vit.embeddings.mask_token': (1, 1, D)})
  params, _ = torch_names.from_hf(state, num_heads=HEADS)
  assert set(params) == {'embedding', 'cls', 'Transformer', 'head'}


def test_vit_b16_timm_state_maps_to_the_models_shapes():
  # Zero-stride inputs cost no memory; only the transposed outputs are copied.
  shapes = timm_shapes(
    d=768, mlp=3072, layers=12, patch=16, tokens=196, classes=1000
  )
  state = {
    key: np.broadcast_to(np.float32(0), shape) for key, shape in shapes.items()
  }
  params, info = torch_names.from_timm(state, num_heads=12)
  images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  model = models.get_model('ViT-B_16', num_classes=1000)
  expected = jax.eval_shape(
    lambda x: model.init(jax.random.key(0), x, train=False), images
  )
  chex.assert_trees_all_equal_shapes_and_dtypes(params, expected['params'])
  assert info['transformer'] == {
    'num_layers': 12,
    'mlp_dim': 3072,
    'num_heads': 12,
    'dropout_rate': 0.0,
    'attention_dropout_rate': 0.0,
  }
  assert (info['hidden_size'], info['patches']) == (768, {'size': (16, 16)})


# Export and round trips.
#########################


@pytest.mark.parametrize('cls_token', [True, False])
def test_timm_round_trip_is_exact(cls_token):
  state = random_state(timm_shapes(cls_token=cls_token))
  params, _ = torch_names.from_timm(state, num_heads=HEADS)
  back = torch_names.to_timm(params, num_heads=HEADS)
  assert set(back) == set(state)
  chex.assert_trees_all_equal(back, state)
  assert all(value.flags.c_contiguous for value in back.values())


def test_our_params_round_trip_through_timm():
  # A 'gap' model: no class token, timm's class_token=False.
  model = models.get_model('ViT-Micro_4', num_classes=CLASSES, posemb='learned')
  params = helpers.random_variables(
    model, jnp.zeros((1, RESOLUTION, RESOLUTION, 3))
  )['params']
  state = torch_names.to_timm(params)
  assert 'cls_token' not in state
  chex.assert_shape(state['blocks.3.attn.qkv.weight'], (3 * 64, 64))
  back, info = torch_names.from_timm(state, num_heads=2)
  chex.assert_trees_all_equal(back, jax.tree.map(np.asarray, params))
  assert (info['classifier'], info['transformer']['num_layers']) == ('gap', 4)


def test_safetensors_round_trip(tmp_path):
  state = random_state(timm_shapes())
  path = tmp_path / 'model.safetensors'
  files.write_safetensors(path, state, metadata={'format': 'pt'})
  chex.assert_trees_all_equal(files.read_safetensors(path), state)
  assert os.listdir(tmp_path) == ['model.safetensors']  # No temporary left.


def test_read_safetensors_widens_half_precision(tmp_path):
  values = np.array([[1.5, -2.25], [3.0, 0.125]], np.float32)
  flat = {
    'half': values.astype(np.float16),
    'bf16': values.astype(jnp.bfloat16),
  }
  files.write_safetensors(tmp_path / 'half.safetensors', flat)
  read = files.read_safetensors(tmp_path / 'half.safetensors')
  chex.assert_trees_all_equal(read, {'half': values, 'bf16': values})


def test_failed_write_keeps_the_old_file(tmp_path):
  path = tmp_path / 'model.safetensors'
  files.write_safetensors(path, {'a': np.ones(3, np.float32)})
  with pytest.raises(CheckpointError, match='model.safetensors'):
    files.write_safetensors(path, {'a': np.array(['not a number'])})
  chex.assert_trees_all_equal(
    files.read_safetensors(path), {'a': np.ones(3, np.float32)}
  )
  assert os.listdir(tmp_path) == ['model.safetensors']


@pytest.mark.parametrize('damage', ['missing', 'garbage', 'truncated'])
def test_unreadable_safetensors_file_is_named(tmp_path, damage):
  path = tmp_path / f'{damage}.safetensors'
  if damage == 'garbage':
    path.write_bytes(b'PK\x03\x04 a zip archive, say, not safetensors')
  elif damage == 'truncated':
    files.write_safetensors(path, random_state(timm_shapes()))
    path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(CheckpointError, match=f'{damage}.safetensors'):
    files.read_safetensors(path)


# Errors.
#########


def test_unknown_keys_are_listed_not_dropped():
  state = random_state(
    {**timm_shapes(), 'blocks.0.ls1.gamma': (D,), 'blocks.1.ls1.gamma': (D,)}
  )
  with pytest.raises(
    CheckpointError, match=r"2 tensor.*'blocks.0.ls1.gamma', 'blocks.1"
  ):
    torch_names.from_timm(state, num_heads=HEADS)
  state = random_state({**hf_shapes(), 'decoder.0.weight': (48, D)})
  with pytest.raises(CheckpointError, match="'decoder.0.weight'"):
    torch_names.from_hf(state, num_heads=HEADS)


def test_num_heads_must_divide_the_hidden_size():
  with pytest.raises(CheckpointError, match='num_heads=5 .* hidden size 32'):
    torch_names.from_timm(random_state(timm_shapes()), num_heads=5)


def test_fc_norm_is_rejected_with_the_reason():
  shapes = timm_shapes(cls_token=False)
  shapes['fc_norm.weight'] = shapes.pop('norm.weight')
  shapes['fc_norm.bias'] = shapes.pop('norm.bias')
  with pytest.raises(CheckpointError, match='fc_norm.*after pooling'):
    torch_names.from_timm(random_state(shapes), num_heads=HEADS)


def test_misshapen_and_missing_tensors_are_named():
  state = random_state(timm_shapes())
  state['blocks.1.mlp.fc2.weight'] = state['blocks.1.mlp.fc2.weight'][:, :8]
  with pytest.raises(
    CheckpointError,
    match=r"'blocks.1.mlp.fc2.weight' has shape \(32, 8\), "
    r'but \(32, 64\)',
  ):
    torch_names.from_timm(state, num_heads=HEADS)
  state = random_state(hf_shapes())
  del state['vit.encoder.layer.1.layernorm_after.bias']
  with pytest.raises(
    CheckpointError,
    match="no 'encoder.layer.1.layernorm_after.bias' "
    r"\(nor 'vit.encoder",
  ):
    torch_names.from_hf(state, num_heads=HEADS)


def test_to_timm_rejects_what_timm_cannot_hold():
  params, _ = torch_names.from_hf(
    random_state(hf_shapes(classifier=False, pooler=True)), num_heads=HEADS
  )
  with pytest.raises(CheckpointError, match='pre_logits'):
    torch_names.to_timm(params)
  del params['pre_logits']
  with pytest.raises(CheckpointError, match='pass num_heads=4'):
    torch_names.to_timm(params, num_heads=8)
  hybrid = {**params, 'conv_root': {'kernel': np.zeros((7, 7, 3, 64))}}
  with pytest.raises(CheckpointError, match='ResNet root'):
    torch_names.to_timm(hybrid)
  del params['Transformer']['posembed_input']  # As with posemb='sincos2d'.
  with pytest.raises(CheckpointError, match="posemb='learned'"):
    torch_names.to_timm(params)


def test_transformers_5_names_import_identically():
  """transformers 5 renames layers in memory; its state dicts must load."""
  v4 = random_state(hf_shapes())
  renames = {
    'encoder.layer.': 'layers.',
    'attention.attention.query.': 'attention.q_proj.',
    'attention.attention.key.': 'attention.k_proj.',
    'attention.attention.value.': 'attention.v_proj.',
    'attention.output.dense.': 'attention.o_proj.',
    'intermediate.dense.': 'mlp.fc1.',
    'output.dense.': 'mlp.fc2.',
  }
  v5 = {}
  for key, value in v4.items():
    for old, new in renames.items():
      key = key.replace(old, new)
    v5[key] = value
  assert 'vit.layers.0.attention.q_proj.weight' in v5
  assert torch_names.detect(v5) == 'hf'
  chex.assert_trees_all_equal(
    torch_names.from_hf(v5, num_heads=HEADS),
    torch_names.from_hf(v4, num_heads=HEADS),
  )
