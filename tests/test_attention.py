"""Attention maps: weights from the forward pass, rollout, per-token maps."""

import os
import re
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from tests import helpers
from vit_jax import attention
from vit_jax import checkpoint
from vit_jax import finetune
from vit_jax import input_pipeline
from vit_jax import models
from vit_jax.attention import render
from vit_jax.checkpoint import inspect
from vit_jax.checkpoint import pretrained
from vit_jax.errors import ConfigError

CROP = 16  # A 4x4 grid of ViT-Micro_4's 4-pixel patches.


def images(count=2):
  return (
    np.random.default_rng(0)
    .uniform(-1, 1, [count, CROP, CROP, 3])
    .astype(np.float32)
  )


def random_row_stochastic(shape, seed=0):
  logits = np.random.default_rng(seed).normal(size=shape)
  return jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)


def test_weights_come_from_the_forward_pass_and_rows_sum_to_one():
  model = models.get_model('ViT-Micro_4', num_classes=10)
  params = helpers.random_variables(model, images())['params']
  weights = attention.attention_weights(model, params, images())
  chex.assert_shape(weights, (4, 2, 2, 16, 16))  # layers, N, heads, T, T
  chex.assert_trees_all_close(
    weights.sum(-1), jnp.ones((4, 2, 2, 16)), atol=1e-5
  )
  assert float(weights.min()) >= 0.0


def test_rollout_of_identity_attention_is_the_identity():
  eye = jnp.broadcast_to(jnp.eye(5), (3, 2, 4, 5, 5))  # layers, N, heads
  for fusion in attention.HEAD_FUSIONS:
    chex.assert_trees_all_close(
      attention.rollout(eye, fusion), jnp.broadcast_to(jnp.eye(5), (2, 5, 5))
    )


@pytest.mark.parametrize('fusion', attention.HEAD_FUSIONS)
def test_rollout_matches_the_hand_computation(fusion):
  weights = random_row_stochastic((3, 2, 4, 6, 6))  # layers, N, heads, T, T
  fused = {'mean': np.mean, 'max': np.max, 'min': np.min}[fusion](
    np.asarray(weights), axis=2
  )
  expected = []
  for n in range(2):
    result = np.eye(6)
    for layer in range(3):
      a = fused[layer, n] + np.eye(6)
      a = a / a.sum(-1, keepdims=True)
      result = a @ result
    expected.append(result)
  chex.assert_trees_all_close(
    attention.rollout(weights, fusion), np.stack(expected), atol=1e-5
  )


def is_query_or_key(path: str) -> bool:
  return '/query/' in path or '/key/' in path


def test_uniform_attention_gives_the_closed_form_maps():
  """Zero query/key weights make every attention row uniform (1/T), so
  the rollout is 0.5^L I + (1 - 0.5^L) / T, and the class token's map is
  (1 - 0.5^L) / T on every patch."""
  model = models.get_model(
    'ViT-Micro_4', num_classes=10, classifier='token', posemb='learned'
  )
  flat = inspect.flatten(helpers.random_variables(model, images())['params'])
  for path in flat:
    if is_query_or_key(path):
      flat[path] = jnp.zeros_like(flat[path])
  params = inspect.unflatten(flat)
  weights = attention.attention_weights(model, params, images())
  tokens, layers = 17, 4
  chex.assert_trees_all_close(
    weights, jnp.full(weights.shape, 1 / tokens), atol=1e-6
  )
  expected = 0.5**layers * np.eye(tokens) + (1 - 0.5**layers) * np.full(
    (tokens, tokens), 1 / tokens
  )
  chex.assert_trees_all_close(
    attention.rollout(weights)[0], expected, atol=1e-6
  )
  grid = attention.patch_grid(model, (CROP, CROP))
  assert grid == (4, 4)
  chex.assert_trees_all_close(
    attention.token_map(attention.rollout(weights), 'token', grid),
    jnp.full((2, 4, 4), (1 - 0.5**layers) / tokens),
    atol=1e-6,
  )
  chex.assert_shape(
    attention.token_map(weights, 'token', grid), (layers, 2, 2, 4, 4)
  )


def test_maps_without_a_class_token_average_the_query_rows():
  matrix = random_row_stochastic((2, 4, 4))
  chex.assert_trees_all_close(
    attention.token_map(matrix, 'gap', (2, 2)),
    np.asarray(matrix).mean(-2).reshape(2, 2, 2),
    atol=1e-6,
  )
  with pytest.raises(ValueError, match='does not match a 3x3 patch grid'):
    attention.token_map(matrix, 'gap', (3, 3))


def test_injected_models_show_their_attention():
  config = helpers.job_config()
  config.finetune.mode = 'injection'
  model = finetune.build_model(config, 10)
  x = images()[:, : helpers.CROP, : helpers.CROP]
  params = helpers.random_variables(model, x)['params']
  chex.assert_shape(
    attention.attention_weights(model, params, x), (2, 2, 2, 4, 4)
  )


def test_models_without_attention_are_refused():
  with pytest.raises(
    ConfigError, match=r'Mixer-Mini_4 \(MlpMixer\) has no attention'
  ):
    attention.attention_weights(
      models.get_model('Mixer-Mini_4', num_classes=10), {}, images()
    )


@pytest.mark.parametrize(
  'name, reason',
  [
    ('Mixer-Mini_4', r'\(MlpMixer\) has no attention: it mixes tokens'),
    ('ResNet-Micro', r'\(ResNet\) has no attention: it is a convolutional'),
    ('Swin-Mini_2-w56', r'\(SwinTransformer\) attends only within shifted'),
    ('R+ViT-Ti_16', r'\(VisionTransformer\) is a hybrid'),
  ],
)
def test_maps_of_models_other_than_a_plain_vit_are_refused_by_name(
  tmp_path, name, reason
):
  """Refused before any image is read or any folder is made."""
  model = models.get_model(name, num_classes=10)
  out = tmp_path / 'out'
  with pytest.raises(
    ConfigError,
    match=rf'^{re.escape(name)} {reason}.*'
    'attention maps need a plain ViT model',
  ):
    render.write_pngs(
      model, {}, [str(tmp_path / 'missing.png')], CROP, str(out)
    )
  assert not out.exists()


def test_the_command_line_refuses_a_mixer_in_one_line(tmp_path):
  model = models.get_model('Mixer-Mini_4', num_classes=10)
  params = helpers.random_variables(model, images())['params']
  checkpoint.save(str(tmp_path / 'mixer.npz'), params)
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'vit_jax.attention',
      '--config=configs/scratch.py:digits,mixer_mini4',
      f'--checkpoint={tmp_path / "mixer.npz"}',
      f'--image={write_image(tmp_path / "a.png", (20, 20), "RGB")}',
      f'--out={tmp_path / "out"}',
    ],
    capture_output=True,
    text=True,
    check=False,
    cwd=os.path.dirname(os.path.dirname(__file__)),
  )
  assert result.returncode == 1, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
    'error: Mixer-Mini_4 (MlpMixer) has no attention: it mixes tokens with '
    'MLPs; attention maps need a plain ViT model (e.g. ViT-B_16, '
    'ViT-Micro_4).'
  )
  assert not (tmp_path / 'out').exists()


def write_image(path, size, mode):
  rng = np.random.default_rng(len(str(path)))
  channels = {'L': (), 'RGB': (3,), 'RGBA': (4,)}[mode]
  PIL.Image.fromarray(
    rng.integers(0, 256, (*size, *channels), np.uint8), mode
  ).save(path)
  return str(path)


def test_pngs_of_image_files_have_the_expected_sizes(tmp_path):
  model = models.get_model('ViT-Micro_4', num_classes=10, classifier='token')
  params = helpers.random_variables(model, images())['params']
  paths = [
    write_image(tmp_path / 'grey.png', (20, 30), 'L'),
    write_image(tmp_path / 'photo.jpg', (40, 40), 'RGB'),
  ]
  written = render.write_pngs(model, params, paths, CROP, str(tmp_path / 'out'))
  assert [os.path.basename(p) for p in written] == [
    'grey_rollout.png',
    'grey_heads.png',
    'photo_rollout.png',
    'photo_heads.png',
  ]
  panel, head = (
    render.PANEL_INCHES * render.DPI,
    render.HEAD_INCHES * render.DPI,
  )
  for path in written:
    with PIL.Image.open(path) as png:
      assert png.format == 'PNG'
      expected = (
        (2 * panel, panel)
        if path.endswith('_rollout.png')
        else (2 * head, 4 * head)
      )  # 2 heads x 4 layers.
      assert png.size == tuple(int(x) for x in expected)


def test_a_file_that_is_not_an_image_is_named(tmp_path):
  bad = tmp_path / 'notes.png'
  bad.write_text('not an image')
  with pytest.raises(
    input_pipeline.DatasetError, match='notes.png is not a JPEG or PNG'
  ):
    input_pipeline.read_images([str(bad)], CROP)


def test_a_checkpoint_loads_as_a_model_at_any_crop(tmp_path):
  config = helpers.job_config()
  config.model.classifier = 'token'
  config.model.posemb = 'learned'
  model = models.build_model(config.model, num_classes=7)
  x = images()[:, :8, :8]
  params = helpers.random_variables(model, x)['params']
  path = str(tmp_path / 'model.npz')
  checkpoint.save(path, params)
  loaded_model, loaded = pretrained.model_from_checkpoint(config.model, path, 8)
  assert loaded_model.num_classes == 7
  chex.assert_trees_all_close(loaded, params)
  # At 12 px the position embeddings are resized to a 3x3 grid.
  _, resized = pretrained.model_from_checkpoint(config.model, path, 12)
  chex.assert_shape(
    resized['Transformer']['posembed_input']['pos_embedding'], (1, 10, 64)
  )
