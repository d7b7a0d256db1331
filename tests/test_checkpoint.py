"""Google .npz loading, inspection, adaptation for fine-tuning, task files
as checkpoints, the CLI."""

import json
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers
from vit_jax import checkpoint
from vit_jax import models
from vit_jax import trainable as trainable_lib
from vit_jax.checkpoint import adapt
from vit_jax.checkpoint import inspect
from vit_jax.checkpoint import pretrained
from vit_jax.checkpoint import task_file


def write_published_npz(path, shapes, seed=0, group_norm_units=False):
  """Writes {path: shape} under the published (pre-linen) keys, random."""
  rng = np.random.default_rng(seed)
  arrays = {}
  for key, shape in shapes.items():
    if group_norm_units and '/gn' in key:
      shape = (1, 1, 1) + shape  # As the hybrid files store them.
    arrays[helpers.pre_linen(key)] = 0.02 * rng.standard_normal(
      shape, np.float32
    )
  np.savez(path, **arrays)
  return arrays


def zeros_like_init(model, resolution):
  """The model's param tree as zeros (cheap stand-in for `init` values)."""
  images = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)
  abstract = jax.eval_shape(
    lambda x: model.init(jax.random.key(0), x, train=False), images
  )
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract['params'])


@pytest.fixture(scope='module')
def b16_i21k_npz(tmp_path_factory):
  """ViT-B/16 as published for ImageNet-21k: pre_logits, 21,843 classes."""
  path = tmp_path_factory.mktemp('ckpt') / 'ViT-B_16.npz'
  shapes = helpers.vit_tree_shapes(
    hidden=768,
    mlp=3072,
    heads=12,
    layers=12,
    patch=16,
    tokens=197,
    num_classes=21_843,
    representation=768,
  )
  arrays = write_published_npz(path, shapes)
  assert 'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel' in arrays
  return str(path), shapes


def test_published_b16_loads_with_linen_names(b16_i21k_npz):
  path, shapes = b16_i21k_npz
  ckpt = checkpoint.read(path)
  assert ckpt.format == 'google' and ckpt.model_options == {}
  assert inspect.shapes(ckpt.params) == shapes


def test_published_b16_adapts_to_10_classes_at_384_and_runs(b16_i21k_npz):
  path, _ = b16_i21k_npz
  model = models.get_model('ViT-B_16', num_classes=10)
  init_params = zeros_like_init(model, 384)
  messages = []
  params = checkpoint.load_pretrained(
    pretrained_path=path,
    init_params=init_params,
    model_config=models.MODEL_CONFIGS['ViT-B_16'],
    log=messages.append,
  )

  assert inspect.shapes(params) == inspect.shapes(init_params)
  chex.assert_shape(
    params['Transformer']['posembed_input']['pos_embedding'], (1, 577, 768)
  )
  assert 'pre_logits' not in params
  np.testing.assert_array_equal(params['head']['kernel'], 0.0)
  loaded = checkpoint.load(path)
  chex.assert_trees_all_equal(
    params['Transformer']['encoderblock_5'],
    loaded['Transformer']['encoderblock_5'],
  )
  assert any('pre_logits' in m for m in messages)
  assert any('(1, 197, 768)' in m and '(1, 577, 768)' in m for m in messages)

  logits = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))(
    params, jnp.ones((1, 384, 384, 3))
  )
  chex.assert_shape(logits, (1, 10))
  chex.assert_tree_all_finite(logits)


def test_hybrid_group_norm_units_are_squeezed(tmp_path):
  """R50+ViT-B/16: GroupNorm parameters stored as (1, 1, 1, C)."""
  shapes = helpers.bit_root_shapes((3, 4, 9))
  shapes.update(
    helpers.vit_tree_shapes(
      hidden=768,
      mlp=3072,
      heads=12,
      layers=12,
      patch=1,
      tokens=197,
      num_classes=21_843,
      representation=768,
      in_channels=1024,
    )
  )
  path = tmp_path / 'R50+ViT-B_16.npz'
  arrays = write_published_npz(path, shapes, group_norm_units=True)
  assert arrays['block3/unit9/gn3/scale'].shape == (1, 1, 1, 1024)

  loaded = checkpoint.load(str(path))
  assert inspect.shapes(loaded) == shapes
  model = models.get_model('R50+ViT-B_16', num_classes=10)
  params = checkpoint.load_pretrained(
    pretrained_path=str(path),
    init_params=zeros_like_init(model, 224),
    model_config=models.MODEL_CONFIGS['R50+ViT-B_16'],
    log=lambda m: None,
  )
  np.testing.assert_array_equal(
    params['block2']['unit3']['gn2']['bias'],
    arrays['block2/unit3/gn2/bias'].reshape(-1),
  )


@pytest.fixture
def small_params():
  model = models.get_model('testing', num_classes=5)
  images = jnp.ones((1, 32, 32, 3))
  return model, jax.tree.map(
    np.asarray, helpers.random_variables(model, images)['params']
  )


def test_npz_round_trip_writes_published_names(tmp_path, small_params):
  _, params = small_params
  path = str(tmp_path / 'testing.npz')
  checkpoint.save(path, params)
  keys = set(np.load(path).files)
  assert (
    'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel'
    in keys
  )
  assert 'Transformer/encoderblock_0/LayerNorm_2/scale' in keys
  chex.assert_trees_all_equal(checkpoint.load(path), params)
  assert [p.name for p in tmp_path.iterdir()] == ['testing.npz']  # No temp.


@pytest.mark.parametrize('layout', ['augreg', 'big_vision'])
def test_augreg_and_big_vision_layouts(tmp_path, small_params, layout):
  _, params = small_params
  flat = inspect.flatten(params)
  if layout == 'big_vision':
    flat = {f'params/{k}': v for k, v in flat.items()}
    flat['opt/some_state'] = np.zeros(3)  # Optimizer state is ignored.
  path = str(tmp_path / f'{layout}.npz')
  np.savez(path, **flat)
  chex.assert_trees_all_equal(checkpoint.load(path), params)


# Position-embedding resizing.
##############################


def test_resize_is_identity_for_same_grid():
  posemb = np.random.default_rng(0).standard_normal((1, 1 + 49, 8))
  for method in adapt.RESIZE_METHODS:
    out = adapt.resize_posemb(posemb, (7, 7), num_prefix=1, method=method)
    np.testing.assert_array_equal(out, posemb.astype(np.float32))


def test_bilinear_resize_of_a_linear_ramp_is_exact():
  # Bilinear interpolation with aligned corners (vit_jax's) reproduces a
  # function linear in (row, col): value(r', c') = a r + b c at the
  # corresponding source coordinates r = r' (n-1)/(n'-1).
  rows, cols = np.mgrid[:4, :6]
  ramp = (2.0 * rows + 0.5 * cols)[..., None] * np.ones(3)
  posemb = np.concatenate(
    [np.full((1, 1, 3), 9.0), ramp.reshape(1, 24, 3)], axis=1
  )
  out = adapt.resize_posemb(posemb, (7, 11), num_prefix=1, old_grid=(4, 6))
  chex.assert_shape(out, (1, 1 + 77, 3))
  np.testing.assert_array_equal(out[0, 0], 9.0)  # Class token kept apart.
  new_rows, new_cols = np.mgrid[:7, :11]
  expected = 2.0 * new_rows * 3 / 6 + 0.5 * new_cols * 5 / 10
  np.testing.assert_allclose(out[0, 1:, 0].reshape(7, 11), expected, atol=1e-5)


@pytest.mark.parametrize('method', adapt.RESIZE_METHODS)
def test_smooth_grid_resized_and_back_stays_close(method):
  rows, cols = np.mgrid[:12, :12] / 12.0
  grid = np.stack([np.sin(2 * rows + cols), np.cos(rows - 3 * cols)], -1)
  posemb = grid.reshape(1, 144, 2)
  up = adapt.resize_posemb(posemb, (24, 24), num_prefix=0, method=method)
  back = adapt.resize_posemb(up, (12, 12), num_prefix=0, method=method)
  np.testing.assert_allclose(back, posemb, atol=0.02)


def test_non_square_grids():
  posemb = np.zeros((1, 1 + 6 * 8, 4))
  out = adapt.resize_posemb(posemb, (12, 16), num_prefix=1, old_grid=(6, 8))
  chex.assert_shape(out, (1, 1 + 192, 4))
  with pytest.raises(checkpoint.CheckpointError, match='square grid'):
    adapt.resize_posemb(posemb, (12, 16), num_prefix=1)


# Bad input.
############


def test_missing_file(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match='nothere.npz'):
    checkpoint.load(str(tmp_path / 'nothere.npz'))


def test_truncated_file(tmp_path, small_params):
  _, params = small_params
  path = tmp_path / 'cut.npz'
  checkpoint.save(str(path), params)
  path.write_bytes(path.read_bytes()[:300])
  with pytest.raises(checkpoint.CheckpointError, match='cut.npz.*truncated'):
    checkpoint.load(str(path))


def test_not_a_checkpoint(tmp_path):
  garbage = tmp_path / 'notes.npz'
  garbage.write_text('hello')
  with pytest.raises(checkpoint.CheckpointError, match='notes.npz'):
    checkpoint.load(str(garbage))
  other = tmp_path / 'other.npz'
  np.savez(other, weights=np.zeros(3))
  with pytest.raises(
    checkpoint.CheckpointError,
    match='other.npz: not a ViT/Mixer/Swin/ResNet checkpoint',
  ):
    checkpoint.load(str(other))


def test_pickled_objects_are_refused(tmp_path):
  path = tmp_path / 'pickled.npz'
  np.savez(path, embedding=np.array([{'kernel': 1}], dtype=object))
  with pytest.raises(
    checkpoint.CheckpointError,
    match="pickled.npz: 'embedding' holds pickled Python",
  ):
    checkpoint.load(str(path))


@pytest.mark.parametrize('seed', range(4))
def test_random_bytes_are_named_without_numpys_pickle_text(tmp_path, seed):
  """numpy reads unknown bytes as a pickle and says 'allow_pickle'; the user
  learns only that the file is not an .npz archive."""
  path = tmp_path / 'random.npz'
  path.write_bytes(np.random.default_rng(seed).bytes(4096))
  with pytest.raises(checkpoint.CheckpointError) as error:
    checkpoint.load(str(path))
  message = str(error.value)
  assert message.startswith(f'{path}: not a readable .npz archive')
  assert 'pickle' not in message.lower()


def test_another_models_checkpoint_names_the_differences(tmp_path):
  shapes = helpers.vit_tree_shapes(
    hidden=384,
    mlp=1536,
    heads=6,
    layers=12,
    patch=16,
    tokens=197,
    num_classes=1000,
  )
  path = tmp_path / 'ViT-S_16.npz'
  write_published_npz(path, shapes)
  model = models.get_model('ViT-B_16', num_classes=10)
  with pytest.raises(checkpoint.CheckpointError) as error:
    checkpoint.load_pretrained(
      pretrained_path=str(path),
      init_params=zeros_like_init(model, 224),
      model_config=models.MODEL_CONFIGS['ViT-B_16'],
      log=lambda m: None,
    )
  message = str(error.value)
  assert 'ViT-S_16.npz does not fit the model' in message
  assert 'embedding/kernel: (16, 16, 3, 384) vs (16, 16, 3, 768)' in message


def test_missing_layers_are_reported(tmp_path):
  shapes = helpers.vit_tree_shapes(
    hidden=768,
    mlp=3072,
    heads=12,
    layers=10,
    patch=16,
    tokens=197,
    num_classes=1000,
  )
  path = tmp_path / 'short.npz'
  write_published_npz(path, shapes)
  with pytest.raises(
    checkpoint.CheckpointError, match='missing from the checkpoint'
  ):
    checkpoint.inspect_params(
      params=checkpoint.load(str(path)),
      expected=zeros_like_init(
        models.get_model('ViT-B_16', num_classes=1000), 224
      ),
    )


# Task files as checkpoints.
############################


def save_task_file(path, params, mode, trainable):
  """Writes `params`' `trainable` leaves as the trainer does after a run of
  finetune.mode `mode` from `base.npz`, on the 'testing' model."""
  task_file.save_task_params(
    str(path),
    params,
    trainable,
    metadata={
      'model': models.MODEL_CONFIGS['testing'].to_dict(),
      'finetune': {'mode': mode},
      'crop': 32,
      'dataset': 'cifar10',
      'num_classes': 5,
      'pretrained_path': 'base.npz',
    },
  )
  return str(path)


def test_a_full_mode_task_file_loads_as_the_pretrained_checkpoint(
  tmp_path, small_params
):
  """Every parameter, the record left out; the head is reset as for any
  pretrained checkpoint."""
  model, params = small_params
  path = save_task_file(tmp_path / 'task.npz', params, 'full', lambda p: True)
  loaded = pretrained.init_params(
    model,
    32,
    seed=0,
    pretrained_path=path,
    model_config=models.MODEL_CONFIGS['testing'],
  )
  _, body = trainable_lib.partition(params, trainable_lib.is_head)
  _, loaded_body = trainable_lib.partition(loaded, trainable_lib.is_head)
  chex.assert_trees_all_close(loaded_body, body)
  assert checkpoint.read(path).format == 'task'


def test_a_head_mode_task_file_as_checkpoint_says_to_export_it(
  tmp_path, small_params
):
  _, params = small_params
  path = save_task_file(
    tmp_path / 'task.npz', params, 'head', trainable_lib.is_head
  )
  with pytest.raises(checkpoint.CheckpointError) as error:
    checkpoint.read(path)
  assert str(error.value).startswith(
    f"{path}: a task file of finetune.mode='head'"
  )
  assert (
    f'python -m vit_jax.finetune export --base=base.npz --task={path} '
    in str(error.value)
  )
  assert '\n' not in str(error.value)


# Command line.
###############


def run_cli(*args):
  return subprocess.run(
    [sys.executable, '-m', 'vit_jax.checkpoint', *args],
    capture_output=True,
    text=True,
  )


def test_cli_inspect(tmp_path, small_params):
  _, params = small_params
  path = str(tmp_path / 'testing.npz')
  checkpoint.save(path, params)
  result = run_cli('inspect', path)
  assert result.returncode == 0, result.stderr
  assert 'format: google' in result.stdout
  total = sum(v.size for v in jax.tree.leaves(params))
  assert f'parameters: {total:,}' in result.stdout
  assert 'Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel' in result.stdout


def test_cli_inspect_describes_a_task_file_and_counts_its_parameters(
  tmp_path, small_params
):
  _, params = small_params
  path = save_task_file(
    tmp_path / 'task.npz', params, 'head', trainable_lib.is_head
  )
  result = run_cli('inspect', path)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert "format: vit_jax task file, finetune.mode='head'" in lines
  head = trainable_lib.count(params, trainable_lib.is_head)
  assert f'parameters: {head:,} in 2 arrays' in lines
  body = trainable_lib.count(params) - head
  assert f'{body:,} more' in result.stdout
  assert any(line.startswith('base: base.npz (fingerprint ') for line in lines)
  assert task_file.META_PREFIX not in result.stdout


def test_cli_reports_errors_without_traceback(tmp_path):
  result = run_cli('inspect', str(tmp_path / 'absent.npz'))
  assert result.returncode == 1
  assert result.stderr.startswith('error: ') and 'absent.npz' in result.stderr
  assert 'Traceback' not in result.stderr


def test_cli_converts_to_timm_safetensors_and_back(tmp_path, small_params):
  _, params = small_params
  npz, st, back = (
    str(tmp_path / n) for n in ('t.npz', 't.safetensors', 'back.npz')
  )
  checkpoint.save(npz, params)
  result = run_cli(
    'convert', npz, st, '--to', 'safetensors', '--num_heads', '2'
  )
  assert result.returncode == 0, result.stderr
  inspected = run_cli('inspect', st, '--num_heads', '2')
  assert 'format: timm' in inspected.stdout
  assert "'approximate_gelu': False" in inspected.stdout
  assert (
    run_cli('convert', st, back, '--to', 'npz', '--num_heads', '2').returncode
    == 0
  )
  chex.assert_trees_all_equal(checkpoint.load(back), params)


def test_timm_file_needs_num_heads(tmp_path, small_params):
  _, params = small_params
  path = str(tmp_path / 'timm.safetensors')
  checkpoint.save(path, params, num_heads=2)
  with pytest.raises(
    checkpoint.CheckpointError,
    match='timm.safetensors: a timm checkpoint.*num_heads',
  ):
    checkpoint.load(path)


def _width_128_params(num_heads: int):
  """Random params of a one-layer ViT of width 128."""
  config = models.MODEL_CONFIGS['testing'].copy_and_resolve_references()
  config.hidden_size = 128
  config.transformer.num_heads = num_heads
  model = models.build_model(config, num_classes=5)
  images = jnp.ones((1, 32, 32, 3))
  return jax.tree.map(
    np.asarray, helpers.random_variables(model, images)['params']
  )


def test_timm_file_without_heads_assumes_64_wide_heads(tmp_path):
  """Width 128 and no config.json: 2 heads, as in published ViTs."""
  params = _width_128_params(num_heads=2)
  path = str(tmp_path / 'model.safetensors')
  checkpoint.save(path, params, num_heads=2)
  chex.assert_trees_all_equal(checkpoint.load(path), params)


@pytest.mark.parametrize(
  'config',
  [
    {'architecture': 'vit_base_patch16_224', 'model_args': {'num_heads': 4}},
    {'num_heads': 4},
    {'model_type': 'vit', 'num_attention_heads': 4},  # Hugging Face.
  ],
)
def test_timm_file_takes_heads_from_the_config_json_beside_it(tmp_path, config):
  """4 heads of 32 channels (not the default 2 of 64), from config.json."""
  params = _width_128_params(num_heads=4)
  path = str(tmp_path / 'model.safetensors')
  checkpoint.save(path, params, num_heads=4)
  assert checkpoint.read(path).params['Transformer']['encoderblock_0'][
    'MultiHeadDotProductAttention_0'
  ]['query']['kernel'].shape == (128, 2, 64)  # The default, without it.
  (tmp_path / 'config.json').write_text(json.dumps(config))
  chex.assert_trees_all_equal(checkpoint.load(path), params)


def test_load_pretrained_requires_the_sources_gelu(tmp_path, small_params):
  model, params = small_params
  path = str(tmp_path / 'timm.safetensors')
  checkpoint.save(path, params, num_heads=2)
  init_params = zeros_like_init(model, 32)
  config = models.MODEL_CONFIGS['testing']
  with pytest.raises(
    checkpoint.CheckpointError, match='approximate_gelu=False'
  ):
    checkpoint.load_pretrained(
      pretrained_path=path,
      init_params=init_params,
      model_config=config,
      log=lambda m: None,
    )
  options = checkpoint.read(path, num_heads=2).model_options
  assert options == {'approximate_gelu': False, 'layernorm_epsilon': 1e-6}
  loaded = checkpoint.load_pretrained(
    pretrained_path=path,
    init_params=init_params,
    reset_head=False,
    model_config={**config, **options},
    log=lambda m: None,
  )
  chex.assert_trees_all_equal(loaded, params)


def test_timm_architecture_builds_the_source_model(tmp_path, small_params):
  model, params = small_params
  path = str(tmp_path / 'timm.safetensors')
  checkpoint.save(path, params, num_heads=2)
  ckpt = checkpoint.read(path, num_heads=2)
  rebuilt = models.VisionTransformer(**ckpt.architecture)
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  exact = models.get_model('testing', num_classes=5, approximate_gelu=False)
  chex.assert_trees_all_close(
    rebuilt.apply({'params': ckpt.params}, images, train=False),
    exact.apply({'params': params}, images, train=False),
    atol=1e-6,
  )


def test_mixer_npz_round_trip(tmp_path):
  model = models.get_model('Mixer-Mini_4', num_classes=5)
  params = jax.tree.map(
    np.asarray,
    helpers.random_variables(model, jnp.ones((1, 32, 32, 3)))['params'],
  )
  path = str(tmp_path / 'mixer.npz')
  checkpoint.save(path, params)
  assert 'MixerBlock_0/token_mixing/Dense_0/kernel' in np.load(path).files
  chex.assert_trees_all_equal(checkpoint.load(path), params)
