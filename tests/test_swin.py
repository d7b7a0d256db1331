"""Swin Transformer: sizes, windows, masks, relative positions, timm weights,
and training in every fine-tuning mode."""

import chex
import jax
import numpy as np
import pytest

from tests import helpers
from tests import test_finetune
from vit_jax import checkpoint
from vit_jax import models
from vit_jax.checkpoint import files
from vit_jax.checkpoint import inspect
from vit_jax.checkpoint import swin_names
from vit_jax.models import swin
from vit_jax.models import table

# A Swin small enough for 8x8 images: patch 2 → a 4x4 grid of 2x2 windows
# (shifted by 1 in odd blocks), then 2x2 after merging (one window).
TINY = {
  'model_name': 'Swin-Test',
  'patch_size': 2,
  'embed_dim': 16,
  'depths': (2, 2),
  'num_heads': (2, 4),
  'window_size': 2,
}


@pytest.mark.parametrize(
  'name,count',
  [('Swin-T', 28_288_354), ('Swin-S', 49_606_258), ('Swin-B', 87_768_224)],
)
def test_parameter_counts_are_the_published_ones(name, count):
  model = models.get_model(name, num_classes=1000)
  assert table.count_params(table.abstract_variables(model, 224)) == count


@pytest.mark.parametrize(
  'swin_name, vit_name',
  [('Swin-Mini_2', 'ViT-Mini_7'), ('Swin-Mini_2-w56', 'ViT-Mini_C3')],
)
def test_small_swins_match_their_vit_within_seven_percent(swin_name, vit_name):
  """The architecture comparison's pairs, at 28 px with 10 classes."""
  counts = [
    table.count_params(
      table.abstract_variables(models.get_model(n, num_classes=10), 28)
    )
    for n in (swin_name, vit_name)
  ]
  assert abs(counts[0] / counts[1] - 1) < 0.07


def test_output_shapes_with_and_without_head():
  model = models.build_model(TINY, num_classes=10)
  images = test_finetune.images(3)
  variables = helpers.random_variables(model, images)
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(
    variables, images
  )
  chex.assert_shape(logits, (3, 10))
  chex.assert_trees_all_close(
    model.apply(variables, images, train=False), logits, atol=1e-5
  )
  features = models.build_model(TINY, num_classes=None).apply(
    {'params': {k: v for k, v in variables['params'].items() if k != 'head'}},
    images,
    train=False,
  )
  chex.assert_shape(features, (3, 32))  # Width doubled by one merge.
  with pytest.raises(
    ValueError, match='6x6 token grid does not split into 4x4 windows'
  ):
    models.build_model({**TINY, 'window_size': 4}, num_classes=10).init(
      jax.random.key(0), np.zeros((1, 12, 12, 3)), train=False
    )


def test_window_partition_round_trip_and_layout():
  x = np.arange(2 * 8 * 12 * 3, dtype=np.float32).reshape(2, 8, 12, 3)
  windows = np.asarray(swin.window_partition(x, 4))
  chex.assert_shape(windows, (2 * 2 * 3, 16, 3))
  # Window (1, 2) of image 0: rows 4..7, columns 8..11, row-major inside.
  np.testing.assert_array_equal(
    windows[1 * 3 + 2], x[0, 4:8, 8:12].reshape(16, 3)
  )
  np.testing.assert_array_equal(swin.window_reverse(windows, 4, 8, 12), x)


@pytest.mark.parametrize(
  'height,width,window,shift', [(8, 8, 4, 2), (8, 12, 4, 2), (14, 14, 7, 3)]
)
def test_shifted_window_mask_blocks_exactly_pairs_from_different_regions(
  height, width, window, shift
):
  """After rolling by -shift, a token in row r came from row (r + shift) mod
  H: rows r >= H - shift wrapped around from the top (likewise columns).
  Two tokens of one window were neighbours in the image iff they wrapped
  alike in both axes; only those may attend to each other."""
  mask = swin.shifted_window_mask(height, width, window, shift)
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing='ij')
  wrapped = np.stack([rows >= height - shift, cols >= width - shift], -1)
  wrapped = np.asarray(
    swin.window_partition(wrapped[None].astype(np.float32), window)
  )  # [windows, w², 2]
  same_region = (wrapped[:, :, None] == wrapped[:, None, :]).all(-1)
  np.testing.assert_array_equal(mask == 0, same_region)
  np.testing.assert_array_equal(mask[~same_region], swin.MASK_VALUE)
  assert (~same_region).any()  # Some pairs are blocked.


def test_shifted_block_mixes_tokens_only_within_their_region():
  """Perturb one input token of a shifted block: exactly the tokens of its
  image region within its shifted window change (attention is the only
  mixing), not the other tokens of that window."""
  block = swin.SwinBlock(num_heads=2, window=4, shifted=True)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 8, 8, 16)).astype(np.float32)
  variables = block.init(jax.random.key(0), x, deterministic=True)
  apply = jax.jit(lambda v, x: block.apply(v, x, deterministic=True))
  perturbed = x.copy()
  perturbed[0, 7, 7] += rng.standard_normal(16)  # Not constant: LayerNorm.
  changed = (
    np.abs(np.asarray(apply(variables, perturbed) - apply(variables, x))).max(
      -1
    )[0]
    > 1e-6
  )
  # Rolled by -2, (7, 7) lands at (5, 5) in window rows/cols 4..7, next to
  # the tokens from rows/cols 0..1 that wrapped around; it came from the
  # 2x2 corner (6..7, 6..7), the only tokens it may mix with.
  expected = np.zeros((8, 8), bool)
  expected[6:8, 6:8] = True
  np.testing.assert_array_equal(changed, expected)


def test_relative_position_index_matches_the_definition():
  window = 3
  index = swin.relative_position_index(window)
  chex.assert_shape(index, (9, 9))
  for i in range(9):
    for j in range(9):
      dy = i // window - j // window
      dx = i % window - j % window
      assert index[i, j] == (dy + window - 1) * (2 * window - 1) + (
        dx + window - 1
      )
  assert set(np.diag(index)) == {(window - 1) * (2 * window - 1) + window - 1}
  assert index.min() == 0 and index.max() == (2 * window - 1) ** 2 - 1


def timm_swin_state(
  embed_dim, depths, heads, window, patch, classes, seed=0, old_layout=False
):
  """A state dict with timm's Swin names and shapes, written from the
  dimensions (independently of the conversion code), random values."""
  rng = np.random.default_rng(seed)
  shapes = {
    'patch_embed.proj.weight': (embed_dim, 3, patch, patch),
    'patch_embed.proj.bias': (embed_dim,),
    'patch_embed.norm.weight': (embed_dim,),
    'patch_embed.norm.bias': (embed_dim,),
  }
  width = embed_dim
  for stage, (depth, head_count) in enumerate(zip(depths, heads)):
    if stage:
      merge = (
        f'layers.{stage - 1}.downsample'
        if old_layout
        else f'layers.{stage}.downsample'
      )
      shapes[f'{merge}.norm.weight'] = (4 * width,)
      shapes[f'{merge}.norm.bias'] = (4 * width,)
      shapes[f'{merge}.reduction.weight'] = (2 * width, 4 * width)
      width *= 2
    for block in range(depth):
      p = f'layers.{stage}.blocks.{block}.'
      shapes.update(
        {
          p + 'norm1.weight': (width,),
          p + 'norm1.bias': (width,),
          p + 'attn.relative_position_bias_table': (
            (2 * window - 1) ** 2,
            head_count,
          ),
          p + 'attn.qkv.weight': (3 * width, width),
          p + 'attn.qkv.bias': (3 * width,),
          p + 'attn.proj.weight': (width, width),
          p + 'attn.proj.bias': (width,),
          p + 'norm2.weight': (width,),
          p + 'norm2.bias': (width,),
          p + 'mlp.fc1.weight': (4 * width, width),
          p + 'mlp.fc1.bias': (4 * width,),
          p + 'mlp.fc2.weight': (width, 4 * width),
          p + 'mlp.fc2.bias': (width,),
        }
      )
  head = 'head' if old_layout else 'head.fc'
  shapes.update(
    {
      'norm.weight': (width,),
      'norm.bias': (width,),
      f'{head}.weight': (classes, width),
      f'{head}.bias': (classes,),
    }
  )
  state = {
    k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()
  }
  if old_layout:  # Buffers that old files carry.
    state['layers.0.blocks.0.attn.relative_position_index'] = (
      swin.relative_position_index(window).astype(np.float32)
    )
    state['layers.0.blocks.1.attn_mask'] = np.zeros(
      (4, window**2, window**2), np.float32
    )
  return state


def test_a_timm_named_swin_file_loads_and_round_trips(tmp_path):
  state = timm_swin_state(16, (2, 2), (2, 4), 2, 2, 10)
  path = str(tmp_path / 'swin.safetensors')
  files.write_safetensors(path, state)
  ckpt = checkpoint.read(path)
  assert ckpt.format == 'timm'
  assert ckpt.architecture == {
    'patch_size': 2,
    'embed_dim': 16,
    'depths': (2, 2),
    'num_heads': (2, 4),
    'window_size': 2,
    'mlp_ratio': 4.0,
    'num_classes': 10,
  }
  model = models.build_model(TINY, num_classes=10)
  expected = table.abstract_variables(model, helpers.CROP)['params']
  assert inspect.shapes(ckpt.params) == inspect.shapes(expected)
  # Values land where timm's layout says: query = the first third of qkv's
  # rows, heads split from the output width; proj's input is (heads, dim).
  attention = ckpt.params['stage_1']['block_1']['attention']
  qkv = state['layers.1.blocks.1.attn.qkv.weight']
  np.testing.assert_array_equal(
    attention['query']['kernel'], qkv[:32].T.reshape(32, 4, 8)
  )
  np.testing.assert_array_equal(
    attention['value']['bias'],
    state['layers.1.blocks.1.attn.qkv.bias'][64:].reshape(4, 8),
  )
  np.testing.assert_array_equal(
    attention['out']['kernel'].reshape(32, 32),
    state['layers.1.blocks.1.attn.proj.weight'].T,
  )
  np.testing.assert_array_equal(
    ckpt.params['embedding']['kernel'],
    state['patch_embed.proj.weight'].transpose(2, 3, 1, 0),
  )
  # Back to timm's names: the same state dict, every tensor.
  exported = str(tmp_path / 'exported.safetensors')
  checkpoint.save(exported, ckpt.params)
  chex.assert_trees_all_close(files.read_safetensors(exported), state)


def test_old_timm_layout_loads_to_the_same_tree(tmp_path):
  new = str(tmp_path / 'new.safetensors')
  old = str(tmp_path / 'old.safetensors')
  files.write_safetensors(new, timm_swin_state(16, (2, 2), (2, 4), 2, 2, 10))
  files.write_safetensors(
    old, timm_swin_state(16, (2, 2), (2, 4), 2, 2, 10, old_layout=True)
  )
  chex.assert_trees_all_close(
    checkpoint.read(old).params, checkpoint.read(new).params
  )


def test_a_swin_file_with_a_missing_tensor_is_named(tmp_path):
  state = timm_swin_state(16, (2, 2), (2, 4), 2, 2, 10)
  del state['layers.1.blocks.0.mlp.fc2.bias']
  path = str(tmp_path / 'broken.safetensors')
  files.write_safetensors(path, state)
  with pytest.raises(
    checkpoint.CheckpointError,
    match=r'broken.safetensors.*layers.1.blocks.0.mlp.fc2.'
    'bias.*standard Swin',
  ):
    checkpoint.read(path)
  assert swin_names.is_timm_swin(state)


def swin_config(mode, method='ia3'):
  config = test_finetune.ft_config(mode, method)
  config.model = TINY
  return config


@pytest.mark.parametrize(
  'mode,method',
  [
    ('full', 'ia3'),
    ('head', 'ia3'),
    ('injection', 'ia3'),
    ('injection', 'lora'),
  ],
)
def test_swin_trains_in_every_fine_tuning_mode(mode, method):
  setup = helpers.create_setup(swin_config(mode, method), num_classes=10)
  flat = inspect.flatten(setup.state.params)
  if mode == 'injection':  # Targets found inside the window attention.
    added = 'ia3_scale' if method == 'ia3' else 'lora_a'
    leaf = 'key' if method == 'ia3' else 'query'
    assert f'stage_1/block_1/attention/{leaf}/{added}' in flat
  before = jax.device_get(setup.state.params)
  after = inspect.flatten(jax.device_get(test_finetune.run_steps(setup).params))
  for path, value in inspect.flatten(before).items():
    moved = not np.array_equal(value, after[path])
    assert moved == setup.trainable(path), path
