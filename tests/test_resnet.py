"""ResNet baselines: matched sizes, vit_jax's names, forward pass, training."""

import chex
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import scratch
from tests import helpers
from vit_jax import checkpoint
from vit_jax import models
from vit_jax import train
from vit_jax.checkpoint import train_state
from vit_jax.models import registry
from vit_jax.models import table

# ResNet: (matched ViT, resolution, classes at which the counts are compared).
MATCHED_VITS = {
  'ResNet-Ti': ('ViT-Ti_16', 224, 1000),
  'ResNet-S': ('ViT-S_16', 224, 1000),
  'ResNet-Micro': ('ViT-Micro_4', 32, 10),
  'ResNet-Mini': ('ViT-Mini_7', 28, 10),
  'ResNet-Mini-222': ('ViT-Mini_C3', 28, 10),
}


def param_shapes(model, resolution: int) -> dict:
  """{'a/b/kernel': shape} of `model`'s parameters, from abstract shapes."""
  params = table.abstract_variables(model, resolution)['params']
  flat = traverse_util.flatten_dict(params, sep='/')
  return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def count(name: str, resolution: int, num_classes: int) -> int:
  """Parameters of registered model `name`, from abstract shapes."""
  model = models.get_model(name, num_classes=num_classes)
  return table.count_params(table.abstract_variables(model, resolution))


def test_every_resnet_is_matched_to_a_vit():
  registered = {n for n in models.MODEL_CONFIGS if n.startswith('ResNet-')}
  assert registered == set(MATCHED_VITS)


@pytest.mark.parametrize('name', sorted(MATCHED_VITS))
def test_parameter_count_is_within_ten_percent_of_the_matched_vit(name):
  vit, resolution, num_classes = MATCHED_VITS[name]
  assert models.DEFAULT_RESOLUTIONS[name] == resolution
  assert models.DEFAULT_RESOLUTIONS[vit] == resolution
  difference = (
    count(name, resolution, num_classes) / count(vit, resolution, num_classes)
    - 1
  )
  assert abs(difference) < 0.10


def test_model_class_follows_the_name_prefix():
  assert models.model_class('ResNet-S') is models.ResNet
  assert models.model_class('Mixer-B_16') is models.MlpMixer
  assert models.model_class('R50+ViT-B_16') is models.VisionTransformer
  assert isinstance(
    models.get_model('ResNet-Micro', num_classes=10), models.ResNet
  )


# ---------------------------------------------------------- parameter names


@pytest.mark.parametrize('name', sorted(MATCHED_VITS))
def test_parameter_tree_is_the_bit_root_and_a_head(name):
  config = models.MODEL_CONFIGS[name]
  expected = helpers.bit_root_shapes(config.stages, config.width)
  if config.root == 'small':
    expected['conv_root/kernel'] = (3, 3, 3, config.width)
  features = 4 * config.width * 2 ** (len(config.stages) - 1)
  expected.update({'head/kernel': (features, 10), 'head/bias': (10,)})
  model = models.get_model(name, num_classes=10)
  assert param_shapes(model, models.DEFAULT_RESOLUTIONS[name]) == expected


def test_root_and_stages_are_the_hybrid_vits():
  """ResNet-S's body is R+ViT's root with the same stages, name for name."""
  stages = tuple(models.MODEL_CONFIGS['ResNet-S'].stages)
  hybrid = models.get_model(
    'R26+ViT-S_32',
    num_classes=10,
    resnet={'num_layers': stages, 'width_factor': 1},
  )
  root = {
    path: shape
    for path, shape in param_shapes(hybrid, 224).items()
    if path.split('/')[0] in ('conv_root', 'gn_root')
    or path.startswith('block')
  }
  body = {
    path: shape
    for path, shape in param_shapes(
      models.get_model('ResNet-S', num_classes=10), 224
    ).items()
    if not path.startswith('head/')
  }
  assert body == root


# ------------------------------------------------------------ forward pass


def micro_resnet_config():
  """ResNet-Micro cut to its first stage (one unit, projected shortcut).

  It has every kind of layer of the whole model (StdConv, GroupNorm without
  batch statistics, the `head`) and compiles several times faster: a strided
  stage's gradient is slow to compile on a CPU. tests/test_models.py sizes
  every registered ResNet.
  """
  config = registry.get_resnet_micro_config()
  config.stages = (1,)
  return config


def images(resolution: int, batch: int = 2) -> jax.Array:
  """A batch of uniform random images in [-1, 1]."""
  return jax.random.uniform(
    jax.random.key(1), (batch, resolution, resolution, 3), minval=-1, maxval=1
  )


def test_without_classes_returns_pooled_features():
  model = models.get_model('ResNet-Mini', num_classes=None)
  features = jax.eval_shape(
    lambda x: model.init_with_output(jax.random.key(0), x, train=False)[0],
    jax.ShapeDtypeStruct((2, 28, 28, 3), jnp.float32),
  )
  assert features.shape == (2, 4 * 32 * 2**2)


def test_bfloat16_keeps_float32_params_and_logits():
  model = models.get_model('ResNet-Micro', num_classes=10, dtype=jnp.bfloat16)
  logits, variables = jax.eval_shape(
    lambda x: model.init_with_output(jax.random.key(0), x, train=False),
    jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32),
  )
  assert logits.dtype == jnp.float32
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {
    np.dtype(np.float32)
  }


def test_unknown_root_is_named():
  model = models.get_model('ResNet-Micro', num_classes=10, root='cifar')
  with pytest.raises(ValueError, match="root='cifar'"):
    model.init(jax.random.key(0), images(32, batch=1), train=False)


# --------------------------------------------------------------- training


@pytest.mark.parametrize(
  'dataset,short_name,crop',
  [('mnist5k', 'resnet_mini', 28), ('digits', 'resnet_micro', 16)],
)
def test_scratch_config_takes_a_small_resnet(dataset, short_name, crop):
  config = scratch.get_config(f'{dataset},{short_name}')
  assert config.model.to_dict() == registry.get_config(short_name).to_dict()
  assert config.pp.crop == crop
  model = models.build_model(config.model, num_classes=10)
  logits = jax.eval_shape(
    lambda x: model.init_with_output(jax.random.key(0), x, train=False)[0],
    jax.ShapeDtypeStruct((1, crop, crop, 3), jnp.float32),
  )
  assert logits.shape == (1, 10)


def job(mode: str):
  """Four steps of `micro_resnet_config` on mnist5k at 8x8, from scratch,
  in fine-tuning `mode`."""
  config = helpers.four_step_config()
  config.model = micro_resnet_config()
  config.finetune.mode = mode
  return config


@pytest.fixture(scope='module')
def initial_params():
  """The parameters every `job` starts from (the trainer's own init)."""
  return jax.device_get(
    helpers.create_setup(job('full'), num_classes=10).state.params
  )


def test_head_starts_at_zero(initial_params):
  model = models.build_model(micro_resnet_config(), num_classes=10)
  np.testing.assert_array_equal(initial_params['head']['kernel'], 0.0)
  np.testing.assert_array_equal(
    model.apply({'params': initial_params}, images(helpers.CROP), train=False),
    0.0,
  )


def split_head(params) -> tuple:
  """({path: leaf} under 'head/', {path: leaf} of the rest) of `params`."""
  flat = traverse_util.flatten_dict(params, sep='/')
  head = {p: v for p, v in flat.items() if p.startswith('head/')}
  body = {p: v for p, v in flat.items() if not p.startswith('head/')}
  return head, body


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['full', 'head'])
def test_trainer_trains_a_small_resnet(mode, initial_params, tmp_path):
  """The head trains in both modes; the body trains in full mode and keeps
  every bit of its initial value in head mode."""
  config = job(mode)

  results = train.train_and_evaluate(config, str(tmp_path))

  assert np.isfinite(results['test_loss'])
  target = jax.eval_shape(
    lambda: helpers.create_setup(config, num_classes=10).state
  )
  with train_state.TrainCheckpointer(str(tmp_path)) as checkpointer:
    trained = checkpointer.restore(target)
  assert int(trained.step) == 4
  head, body = split_head(jax.device_get(trained.params))
  initial_head, initial_body = split_head(initial_params)
  assert not np.array_equal(head['head/kernel'], initial_head['head/kernel'])
  if mode == 'head':
    assert results['trainable_params'] == 4 * 16 * 10 + 10
    chex.assert_trees_all_equal(body, initial_body)
  else:
    assert results['trainable_params'] == results['total_params']
    assert any(not np.array_equal(body[p], initial_body[p]) for p in body)


def test_a_saved_resnet_loads_as_a_pretrained_checkpoint(tmp_path):
  """Saved to .npz, a ResNet reloads whole and initialises another ResNet of
  the same body with a new (zero) MLP head, for head-only fine-tuning."""
  config = models.MODEL_CONFIGS['ResNet-Micro']
  model = models.build_model(config, num_classes=1000)
  images = np.zeros((1, 16, 16, 3), np.float32)
  params = helpers.random_variables(model, images)['params']
  path = str(tmp_path / 'resnet.npz')
  checkpoint.save(path, params)
  chex.assert_trees_all_close(checkpoint.load(path), params)
  target = models.build_model(config, num_classes=10, head_mlp_dim=8)
  init = helpers.random_variables(target, images)['params']
  loaded = checkpoint.load_pretrained(
    pretrained_path=path, init_params=init, model_config=config.to_dict()
  )
  chex.assert_trees_all_close(
    {k: v for k, v in loaded.items() if k != 'head'},
    {k: v for k, v in params.items() if k != 'head'},
  )
  assert set(loaded['head']) == {'hidden', 'out'}
