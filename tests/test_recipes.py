"""configs/recipes.py: each published recipe carries its source's numbers
(steps from epochs, weight decay in this project's convention, what is
decayed), passes the config checks, and trains on a mocked ImageNet."""

import json
import math
import os
import re

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import recipes
from tests import test_configs
from tests import tfds_mock
from vit_jax import config_checks
from vit_jax import models
from vit_jax import optim
from vit_jax import test_utils
from vit_jax import train as train_lib
from vit_jax import trainable as trainable_lib

# Models cut to CPU size, keeping each recipe's classifier, position
# embeddings and head: width 16, 2 layers, a 2x2 patch grid at 32 px.
TINY_MODEL = (
  '--config.model.hidden_size=16',
  '--config.model.transformer.mlp_dim=32',
  '--config.model.transformer.num_heads=2',
  '--config.model.transformer.num_layers=2',
)
# ViT-S/16's tanh pre-logits layer is as wide as the model.
TINY_EXTRA = {
  'vit_s16_i1k': ('--config.model.representation_size=16',),
  'beit_b16_ft_i1k': (),
}


def recipe(name, *overrides):
  """The recipe as `vit_jax.main` parses `--config=configs/recipes.py:NAME`."""
  return test_configs.parse(
    f'--config={test_configs.REPO}/configs/recipes.py:{name}', *overrides
  )


def tiny(name, *overrides):
  """`recipe` with its model cut to `TINY_MODEL`."""
  return recipe(name, *TINY_MODEL, *TINY_EXTRA[name], *overrides)


def param_shapes(config, crop=32):
  """The parameter shapes of `config.model` at `crop` px, from
  `jax.eval_shape`: nothing is initialised."""
  model = models.build_model(config.model, num_classes=10)
  images = jnp.zeros((1, crop, crop, 3))
  return jax.eval_shape(
    lambda: model.init(jax.random.key(0), images, train=False)
  )['params']


@pytest.mark.parametrize('name', sorted(recipes.RECIPES))
def test_recipe_passes_the_config_checks(name):
  config_checks.check(train_lib.with_complete_pp(recipe(name)))


@pytest.mark.parametrize('name', sorted(recipes.RECIPES))
def test_docstring_opens_with_the_command_and_the_figure(name):
  summary, command = recipes.RECIPES[name].__doc__.split('\n\n')[:2]
  assert re.search(r'\d\d\.\d% published', ' '.join(summary.split()))
  assert command.split()[:4] == [
    'python',
    '-m',
    'vit_jax.main',
    f'--config=configs/recipes.py:{name}',
  ]


def test_unknown_recipe_names_the_known_ones():
  with pytest.raises(ValueError, match='beit_b16_ft_i1k'):
    recipes.get_config('vit_s16_i21k')


def test_vit_s16_i1k_runs_big_vision_s_90_epochs():
  config = recipe('vit_s16_i1k')
  assert config.pp.train == 'train[:99%]' and config.pp.test == 'validation'
  # tfds rounds a percent boundary to the closest example; big_vision
  # rounds epochs * images / batch to the closest step.
  assert recipes.IMAGENET_TRAIN_99_IMAGES == round(
    0.99 * recipes.IMAGENET_TRAIN_IMAGES
  )
  assert config.total_steps == round(
    90 * recipes.IMAGENET_TRAIN_99_IMAGES / config.batch
  )
  assert (config.batch, config.warmup_steps) == (1024, 10_000)
  model = config.model
  assert (model.classifier, model.posemb) == ('gap', 'sincos2d')
  assert model.representation_size == model.hidden_size == 384


# The decay a step subtracts from a kernel of 1s at the schedule's peak,
# before layer decay: big_vision's wd * sched = 1e-4; BEiT's lr * wd.
PEAK_DECAY = {'vit_s16_i1k': 1e-4, 'beit_b16_ft_i1k': 4e-3 * 0.05}


@pytest.mark.parametrize('name', sorted(recipes.RECIPES))
def test_a_step_decays_the_kernels_alone(name):
  """With zero gradients at the schedule's peak, one step of the recipe's
  optimizer subtracts PEAK_DECAY (times the leaf's layer-decay factor)
  from every kernel, as big_vision (`.*/kernel$`) and BEiT decay, and
  leaves biases, norms, class token and position embeddings alone."""
  config = tiny(name, '--config.warmup_steps=0')
  params = jax.tree.map(lambda s: jnp.ones(s.shape), param_shapes(config))
  _, optimizer = optim.from_config(config)
  lr_mults, _ = optim.multipliers_from_config(config)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(optimizer.update)(zeros, optimizer.init(params), params)
  flat = traverse_util.flatten_dict(dict(updates), sep='/')
  kernels = {path for path in flat if path.endswith('/kernel')}
  assert {'embedding/kernel', 'head/kernel'} <= kernels
  for path, update in flat.items():
    factor = lr_mults(path) if lr_mults else 1.0
    expected = -PEAK_DECAY[name] * factor if path in kernels else 0.0
    np.testing.assert_allclose(update, expected, rtol=1e-5, err_msg=path)


def test_beit_b16_ft_i1k_runs_beit_s_100_epochs():
  config = recipe('beit_b16_ft_i1k')
  # BEiT's loader drops the last partial batch: 1,251 steps an epoch.
  per_epoch = recipes.IMAGENET_TRAIN_IMAGES // config.batch
  assert per_epoch == 1_251 and config.pp.train == 'train'
  assert config.total_steps == 100 * per_epoch
  assert config.warmup_steps == 20 * per_epoch
  assert config.grad_norm_clip is None


def test_beit_b16_ft_i1k_scales_each_leaf_as_beit():
  """On ViT-B/16's own parameter paths: the embedding trains at 0.65^13
  of the rate, block i at 0.65^(12-i), the head at 1; the weight-decay
  rules take the class token, the position embeddings and the biases."""
  config = recipe('beit_b16_ft_i1k')
  paths = trainable_lib.paths(param_shapes(config, crop=224))
  lr_mults, wd_mults = optim.multipliers_from_config(config)
  assert lr_mults('embedding/kernel') == pytest.approx(0.65**13)
  assert lr_mults('Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel') == (
    pytest.approx(0.65**12)
  )
  assert lr_mults('head/kernel') == 1.0
  undecayed = {path for path in paths if wd_mults(path) == 0}
  assert undecayed == {
    'cls',
    'Transformer/posembed_input/pos_embedding',
    *(path for path in paths if path.endswith('/bias')),
  }


@pytest.fixture
def mock_imagenet(tmp_path):
  """tfds's imagenet2012 with 8 random images in each split."""
  data_dir = str(tmp_path / 'tfds')
  sizes = {'train': 8, 'validation': 8}
  with tfds_mock.mock_tfds(data_dir, 'imagenet2012', sizes, num_examples=8):
    yield data_dir


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(recipes.RECIPES))
def test_recipe_trains_three_steps_on_mock_imagenet(
  name, mock_imagenet, tmp_path
):
  """The recipe as configured, cut to CPU size: a tiny model at 32 px,
  batch 8, 3 steps; the fine-tuning recipe from a random Google-format
  checkpoint of that model."""
  config = tiny(
    name,
    f'--config.tfds_data_dir={mock_imagenet}',
    '--config.tfds_download=False',
    '--config.pp.crop=32',
    '--config.batch=8',
    '--config.batch_eval=8',
    '--config.total_steps=3',
    '--config.warmup_steps=1',
    '--config.shuffle_buffer=8',
    '--config.eval_every=0',
    '--config.progress_every=1',
    '--config.checkpoint_every=0',
  )
  if config.pretrained_dir:
    checkpoint = str(tmp_path / 'pretrained.npz')
    test_utils.create_checkpoint(config.model, checkpoint)
    config.pretrained_path = checkpoint
  workdir = str(tmp_path / 'run')
  results = train_lib.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f)['steps'] == results['steps'] == 3
  assert results['test_examples'] == 8
  assert math.isfinite(results['test_loss'])
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f]
  losses = [line['train/loss'] for line in lines if 'train/loss' in line]
  assert len(losses) == 3 and all(map(math.isfinite, losses))
