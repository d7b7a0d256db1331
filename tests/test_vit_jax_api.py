"""The entry points of Google's vit_jax that its users call, under their
names: `utils.create_learning_rate_schedule`, `input_pipeline.get_datasets`,
`models.VisionTransformer(**config)`, `train.make_update_fn`
(`checkpoint.load_pretrained` is tested in test_checkpoint.py); and its
module paths: `vit_jax.configs` (models, common, inference_time),
`vit_jax.inference_time`, `vit_jax.test_utils`, `input_pipeline.prefetch`."""

import json
import pathlib
import subprocess
import sys

from absl import flags
import chex
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax
from PIL import Image
import pytest
import tensorflow as tf

from configs import common
from tests import helpers
from vit_jax import checkpoint
from vit_jax import inference_time
from vit_jax import input_pipeline
from vit_jax import models
from vit_jax import steps
from vit_jax import test_utils
from vit_jax import train
from vit_jax import utils
import vit_jax.configs as vit_jax_configs
from vit_jax.configs import common as vit_jax_common
from vit_jax.configs import inference_time as vit_jax_inference_time
from vit_jax.configs import models as config_lib
from vit_jax.errors import ConfigError


def vit_jax_schedule(step, total_steps, base, decay_type, warmup_steps):
  """vit_jax's formula, written out (linear_end=1e-5)."""
  progress = np.clip((step - warmup_steps) / (total_steps - warmup_steps), 0, 1)
  if decay_type == 'linear':
    lr = 1e-5 + (base - 1e-5) * (1 - progress)
  elif decay_type == 'cosine':
    lr = base * 0.5 * (1 + np.cos(np.pi * progress))
  else:
    lr = base
  return lr * min(1.0, step / warmup_steps)


@pytest.mark.parametrize('decay_type', ['cosine', 'linear', 'constant'])
def test_create_learning_rate_schedule_is_vit_jax_s(decay_type):
  schedule = utils.create_learning_rate_schedule(
    total_steps=200, base=0.03, decay_type=decay_type, warmup_steps=20
  )
  steps = [0, 7, 20, 21, 110, 199, 200, 250]
  np.testing.assert_allclose(
    [float(schedule(s)) for s in steps],
    [vit_jax_schedule(s, 200, 0.03, decay_type, 20) for s in steps],
    rtol=1e-5,
    atol=1e-9,
  )


def test_get_datasets_returns_train_and_test_batches_per_device():
  config = common.with_dataset(common.get_config(), 'digits')
  config.pp.crop = 8
  config.batch, config.batch_eval, config.shuffle_buffer = 16, 64, 100
  ds_train, ds_test = input_pipeline.get_datasets(config)
  devices = jax.local_device_count()
  batch = next(ds_train.as_numpy_iterator())
  chex.assert_shape(batch['image'], (devices, 16 // devices, 8, 8, 3))
  chex.assert_shape(batch['label'], (devices, 16 // devices))
  masks = [b['mask'] for b in ds_test.as_numpy_iterator()]
  assert int(np.sum(masks)) == 360  # Every test image once.


@pytest.mark.parametrize(
  'name, size', [('testing', 21_390), ('testing-unpooled', 21_370)]
)
def test_vision_transformer_from_a_model_config(name, size):
  """vit_jax's `models.VisionTransformer(num_classes=..., **config)`, with
  its models_test.py parameter counts."""
  model = models.VisionTransformer(
    num_classes=1000, **models.MODEL_CONFIGS[name]
  )
  images = jnp.ones([2, 224, 224, 3])
  variables = helpers.random_variables(model, images)
  assert sum(x.size for x in jax.tree.leaves(variables)) == size
  out = model.apply(variables, images, train=False)
  chex.assert_shape(out, (2, 196, 1000) if 'unpooled' in name else (2, 1000))


@pytest.mark.parametrize('accum_steps', [1, 2])
def test_make_update_fn_is_one_sgd_step_on_the_whole_batch(accum_steps):
  """vit_jax's pmapped update over every local device, with one-hot labels
  and gradient accumulation, equals plain SGD on the whole batch at once."""
  model = models.get_model('testing', num_classes=10)
  model = model.clone(transformer={**model.transformer, 'dropout_rate': 0.0})
  devices = jax.local_device_count()
  per_device = 4
  images = jax.random.normal(
    jax.random.key(1), (devices * per_device, 32, 32, 3)
  )
  labels = jax.nn.one_hot(jnp.arange(devices * per_device) % 10, 10)
  params = helpers.random_variables(model, images[:1])['params']
  tx = optax.sgd(0.5)
  update_fn = train.make_update_fn(
    apply_fn=model.apply, accum_steps=accum_steps, tx=tx
  )
  batch = {
    'image': images.reshape(devices, per_device, 32, 32, 3),
    'label': labels.reshape(devices, per_device, 10),
  }
  new_params, _, loss, rng = update_fn(
    steps.replicate(params),
    steps.replicate(tx.init(params)),
    batch,
    steps.replicate(jax.random.PRNGKey(0)),  # vit_jax's raw uint32 key
  )

  def whole_batch_loss(p):
    logits = model.apply({'params': p}, images, train=False)
    return optax.softmax_cross_entropy(logits, labels).mean()

  expected_loss, grads = jax.value_and_grad(whole_batch_loss)(params)
  expected = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
  chex.assert_trees_all_close(
    steps.unreplicate(new_params), expected, rtol=1e-4, atol=1e-6
  )
  np.testing.assert_allclose(loss, np.full(devices, expected_loss), rtol=1e-5)
  assert not np.array_equal(steps.unreplicate(rng), jax.random.PRNGKey(0))


# ------------------------------------------- vit_jax's module paths: configs

REPO = pathlib.Path(__file__).resolve().parent.parent

# The non-LiT models of vit_jax's models_test.py.
VIT_JAX_MODEL_NAMES = {
  'testing',
  'testing-unpooled',
  'ViT-Ti_16',
  'ViT-S_16',
  'ViT-B_16',
  'ViT-L_16',
  'ViT-H_14',
  'ViT-S_16-gap-norep',
  'ViT-B_16-gap-norep',
  'ViT-B_8',
  'ViT-S_32',
  'ViT-B_32',
  'ViT-L_32',
  'ViT-S_32-gap-norep',
  'ViT-B_32-gap-norep',
  'R+ViT-Ti_16',
  'R50+ViT-B_16',
  'R26+ViT-B_32',
  'R26+ViT-S_32',
  'R50+ViT-L_32',
  'Mixer-B_16',
  'Mixer-B_32',
  'Mixer-L_16',
}


def test_vit_jax_configs_package_holds_the_repository_configs():
  assert pathlib.Path(vit_jax_configs.__file__).parent.resolve() == (
    REPO / 'configs'
  )
  assert vit_jax_common.get_config().to_dict() == common.get_config().to_dict()
  assert vit_jax_inference_time.get_config().trainer == 'inference_time'


def test_model_configs_are_vit_jax_s_names_from_the_registry():
  assert set(config_lib.MODEL_CONFIGS) == VIT_JAX_MODEL_NAMES
  for name, config in config_lib.MODEL_CONFIGS.items():
    assert config is models.MODEL_CONFIGS[name]
  assert config_lib.get_b16_config().to_dict() == (
    models.MODEL_CONFIGS['ViT-B_16'].to_dict()
  )
  assert config_lib.get_testing_config().model_name == 'testing'


@pytest.mark.parametrize(
  'get_config, size',
  [
    (config_lib.get_ti16_config, 5_717_416),
    (config_lib.get_r_ti16_config, 6_337_704),
    (config_lib.get_mixer_b32_config, 60_293_428),
  ],
)
def test_model_config_parameter_counts_are_vit_jax_s(get_config, size):
  """vit_jax's models_test.py counts, at 224 px with 1000 classes (shapes
  only, nothing computed)."""
  model = models.build_model(get_config(), num_classes=1000)
  shapes = jax.eval_shape(
    lambda: model.init(
      jax.random.key(0), jnp.ones([1, 224, 224, 3]), train=False
    )
  )
  assert sum(x.size for x in jax.tree.leaves(shapes)) == size


def test_vit_jax_config_path_parses_as_the_repository_s():
  """vit_jax's README command:
  `--config=$(pwd)/vit_jax/configs/vit.py:b16,cifar10`."""
  argv = ['main', f'--config={REPO}/vit_jax/configs/vit.py:b16,cifar10']
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file(
    'config', flag_values=flag_values, sys_argv=argv
  )
  flag_values(argv)
  config = flag_values.config
  assert config.model.model_name == 'ViT-B_16'
  assert (config.dataset, config.pp.crop) == ('cifar10', 384)


# ------------------------------------------------ test_utils and checkpoint


def test_create_checkpoint_loads_into_a_model_of_its_config(tmp_path):
  path = str(tmp_path / 'testing.npz')
  model_config = config_lib.get_testing_config()
  test_utils.create_checkpoint(model_config, path)
  saved = checkpoint.load(path)
  model = models.VisionTransformer(num_classes=2, **model_config)
  init = helpers.random_variables(model, jnp.ones([1, 32, 32, 3]))['params']
  loaded = checkpoint.load_pretrained(
    pretrained_path=path, init_params=init, model_config=model_config
  )
  np.testing.assert_array_equal(
    loaded['embedding']['kernel'], saved['embedding']['kernel']
  )
  # The file's one-class head is replaced by the model's own.
  chex.assert_trees_all_equal(loaded['head'], init['head'])


def test_save_takes_vit_jax_s_argument_order(tmp_path):
  model = models.get_model('testing', num_classes=2)
  params = helpers.random_variables(model, jnp.ones([1, 16, 16, 3]))['params']
  checkpoint.save(params, str(tmp_path / 'vit_jax_order.npz'))
  checkpoint.save(str(tmp_path / 'ours.npz'), params)
  chex.assert_trees_all_equal(
    checkpoint.load(str(tmp_path / 'vit_jax_order.npz')),
    checkpoint.load(str(tmp_path / 'ours.npz')),
  )


# ----------------------------------------------------------- inference_time


def vit_jax_timing_config(pretrained_dir):
  """vit_jax's inference_time config for the 'testing' model at 32 px."""
  config = vit_jax_inference_time.get_config()
  config.update(
    {
      'model_name': 'testing',
      'num_classes': 10,
      'image_size': 32,
      'batch': 8,
      'steps': 2,
      'initial_steps': 1,
      'pretrained_dir': pretrained_dir,
    }
  )
  return config


def test_inference_time_reads_vit_jax_s_config(tmp_path):
  test_utils.create_checkpoint(
    config_lib.get_testing_config(), str(tmp_path / 'testing.npz')
  )
  results = inference_time.inference_time(
    vit_jax_timing_config(str(tmp_path)), str(tmp_path)
  )
  assert (results['model'], results['resolution']) == ('testing', 32)
  assert (results['batch'], results['num_classes']) == (8, 10)
  assert results['imgs_sec_core_min'] <= results['imgs_sec_core_max']
  written = json.loads((tmp_path / 'inference_time.json').read_text())
  assert written == results
  assert list(tmp_path.glob('events.out.tfevents.*'))


@pytest.mark.parametrize('key', ['batch', 'num_classes', 'image_size'])
def test_inference_time_names_an_unset_vit_jax_key(tmp_path, key):
  config = vit_jax_timing_config(None)
  config[key] = 0
  with pytest.raises(ConfigError, match=rf'^config\.{key}=0;'):
    inference_time.inference_time(config, str(tmp_path))


@pytest.mark.parametrize('module', ['vit_jax.main', 'vit_jax.inference_time'])
def test_vit_jax_s_timing_config_runs_from_the_command_line(tmp_path, module):
  process = subprocess.run(
    [
      sys.executable,
      '-m',
      module,
      f'--config={REPO}/vit_jax/configs/inference_time.py',
      f'--workdir={tmp_path}',
      '--config.model_name=testing',
      '--config.batch=1',
      '--config.image_size=16',
      '--config.num_classes=2',
      '--config.steps=1',
      '--config.initial_steps=0',
    ],
    cwd=REPO,
    env=helpers.cpu_env(),
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert process.returncode == 0, process.stderr[-3000:]
  results = json.loads((tmp_path / 'inference_time.json').read_text())
  assert (results['model'], results['devices']) == ('testing', 1)


# ------------------------------------------- input pipeline and train, vit_jax


def test_pp_without_splits_or_augmentation_gets_vit_jax_s():
  pp = input_pipeline.complete_pp(ml_collections.ConfigDict({'crop': 16}))
  assert (pp.train, pp.test, pp.crop) == ('train', 'test', 16)
  assert (pp.augment, pp.flip) == ('inception_crop', True)
  with pytest.raises(ConfigError, match=r'^config\.pp\.crop is not set'):
    input_pipeline.complete_pp(ml_collections.ConfigDict({'test': 'test'}))


@pytest.mark.parametrize('n_prefetch', [0, 2])
def test_prefetch_iterates_batches_onto_the_devices(n_prefetch):
  devices = jax.local_device_count()
  dataset = tf.data.Dataset.from_tensors(
    {'image': np.ones([devices, 2, 4], np.float32)}
  ).repeat(3)
  batches = list(input_pipeline.prefetch(dataset, n_prefetch))
  assert len(batches) == 3
  image = batches[0]['image']
  chex.assert_shape(image, (devices, 2, 4))
  if n_prefetch:
    assert len(image.sharding.device_set) == devices
  else:
    assert isinstance(image, np.ndarray)


@pytest.mark.slow
def test_train_and_evaluate_on_a_folder_with_only_a_crop(tmp_path):
  """vit_jax's train_test: an image folder, `pp = {'crop': ...}` (the
  `train/` and `test/` folders are the splits), vit_jax's testing model
  from `pretrained_dir`, one step."""
  dataset = tmp_path / 'dataset'
  for split in ('train', 'test'):
    for label, name in enumerate(('black', 'white')):
      (dataset / split / name).mkdir(parents=True)
      for i in range(4):
        Image.new('RGB', (2, 2), (255 * label,) * 3).save(
          dataset / split / name / f'{i}.png'
        )
  config = common.get_config()
  config.model = config_lib.get_testing_config()
  config.dataset = str(dataset)
  config.pp = ml_collections.ConfigDict({'crop': 16})
  config.update({'batch': 8, 'batch_eval': 8, 'accum_steps': 1})
  config.total_steps = 1
  config.pretrained_dir = str(tmp_path)
  test_utils.create_checkpoint(config.model, str(tmp_path / 'testing.npz'))
  workdir = tmp_path / 'workdir'
  train.train_and_evaluate(config, str(workdir))
  results = json.loads((workdir / 'results.json').read_text())
  assert results['steps'] == 1
  assert results['test_examples'] == 8
