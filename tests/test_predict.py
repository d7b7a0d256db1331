"""vit_jax.predict (top-k on image files) and publishing a run as a folder."""

import dataclasses
import json
import os
import subprocess
import sys

import chex
import jax
import numpy as np
import PIL.Image
import pytest

from tests import helpers
from vit_jax import checkpoint
from vit_jax import input_pipeline
from vit_jax import models
from vit_jax import predict
from vit_jax import publish
from vit_jax import train as train_lib
from vit_jax.checkpoint import inspect
from vit_jax.checkpoint import task_file
from vit_jax.errors import ConfigError
from vit_jax.input_pipeline import embedded
from vit_jax.models import vit

COMMAND = 'python -m vit_jax.main --config=configs/scratch.py:mnist5k'


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A finished 6-step run (two-layer ViT-Micro, sincos2d + GAP) on mnist5k."""
  workdir = str(tmp_path_factory.mktemp('run'))
  config = helpers.job_config()
  results = train_lib.train_and_evaluate(config, workdir, COMMAND)
  return workdir, config, results


@pytest.fixture(scope='module')
def digit_files(tmp_path_factory):
  """Five mnist5k test digits as 28x28 PNGs, and their labels."""
  folder = tmp_path_factory.mktemp('digits')
  test = list(embedded.load_mnist5k().examples('test').as_numpy_iterator())
  indices = [0, 150, 420, 777, 999]  # 100 per digit: digits 0, 1, 4, 7, 9.
  paths = []
  for index in indices:
    path = str(folder / f'test_{index}.png')
    PIL.Image.fromarray(test[index]['image'][..., 0]).save(path)
    paths.append(path)
  return paths, [int(test[i]['label']) for i in indices]


def reference_probabilities(model, params, paths, crop):
  """Softmax of the model on the files, read as evaluation reads them."""
  images = input_pipeline.read_images(paths, crop)
  logits = model.apply({'params': params}, images, train=False)
  return np.asarray(jax.nn.softmax(logits))


def task_path(run):
  return os.path.join(run[0], 'task_params.npz')


def test_task_file_of_a_full_run_predicts_without_a_base(run, digit_files):
  paths, labels = digit_files
  classifier = predict.from_task(None, task_path(run))
  assert classifier.class_names == tuple(str(d) for d in range(10))
  predictions = list(predict.predict(classifier, paths, top_k=3))
  expected = reference_probabilities(
    classifier.model, classifier.params, paths, classifier.crop
  )
  assert [p.path for p in predictions] == paths
  for prediction, row in zip(predictions, expected):
    best = np.argsort(-row)[:3]
    assert [name for name, _ in prediction.top] == [str(i) for i in best]
    chex.assert_trees_all_close(
      np.array([p for _, p in prediction.top]), row[best], atol=1e-6
    )
  assert labels == [0, 1, 4, 7, 9]


def test_batches_padded_to_size_give_the_same_predictions(run, digit_files):
  paths, _ = digit_files
  classifier = predict.from_task(None, task_path(run))
  one_batch = list(predict.predict(classifier, paths, top_k=10, batch=64))
  in_twos = list(predict.predict(classifier, paths, top_k=10, batch=2))
  for a, b in zip(one_batch, in_twos):
    assert [n for n, _ in a.top] == [n for n, _ in b.top]
    chex.assert_trees_all_close(
      [p for _, p in a.top], [p for _, p in b.top], atol=1e-6
    )
  text = predict.format_prediction(one_batch[0])
  assert text.splitlines()[0] == paths[0] and len(text.splitlines()) == 11


def test_shifted_views_average_the_softmax_of_the_shifted_images(
  run, digit_files
):
  paths, _ = digit_files
  classifier = dataclasses.replace(
    predict.from_task(None, task_path(run)), eval_shift=1
  )
  images = input_pipeline.read_images(paths, classifier.crop)
  expected = np.mean(
    [
      jax.nn.softmax(
        classifier.model.apply(
          {'params': classifier.params},
          helpers.numpy_shift(images, r, c),
          train=False,
        )
      )
      for r in (-1, 0, 1)
      for c in (-1, 0, 1)
    ],
    axis=0,
  )
  chex.assert_trees_all_close(
    classifier.probabilities(images), expected, atol=1e-6
  )
  one_view = predict.from_task(None, task_path(run)).probabilities(images)
  assert not np.allclose(one_view, expected, atol=1e-6)
  with pytest.raises(
    ConfigError, match=r'Classifier.eval_shift=14 must be .* Classifier.crop=8'
  ):
    dataclasses.replace(classifier, eval_shift=14)


def test_a_checkpoint_with_a_config_names_the_dataset_classes(
  run, digit_files, tmp_path
):
  paths, _ = digit_files
  task = predict.from_task(None, task_path(run))
  path = str(tmp_path / 'model.npz')
  checkpoint.save(path, jax.tree.map(np.asarray, task.params))
  config = run[1]
  classifier = predict.from_checkpoint(config, path)
  assert classifier.class_names == embedded.DIGIT_NAMES
  chex.assert_trees_all_close(
    reference_probabilities(
      classifier.model, classifier.params, paths, classifier.crop
    ),
    reference_probabilities(task.model, task.params, paths, task.crop),
    atol=1e-6,
  )
  names = [f'digit {d}' for d in range(10)]
  assert predict.from_checkpoint(config, path, names).class_names == tuple(
    names
  )
  with pytest.raises(
    ValueError, match='names 2 classes, but the model has 10 outputs'
  ):
    predict.from_checkpoint(config, path, ['a', 'b'])


def test_a_checkpoint_that_does_not_match_the_config_is_named(run, tmp_path):
  task = predict.from_task(None, task_path(run))
  path = str(tmp_path / 'model.npz')
  checkpoint.save(path, jax.tree.map(np.asarray, task.params))
  config = helpers.job_config()
  config.model.hidden_size = 32
  with pytest.raises(checkpoint.CheckpointError, match='model.npz'):
    predict.from_checkpoint(config, path)


def test_unreadable_and_corrupt_images_are_named(run, digit_files, tmp_path):
  classifier = predict.from_task(None, task_path(run))
  text = tmp_path / 'notes.png'
  text.write_text('not an image')
  with pytest.raises(
    input_pipeline.DatasetError, match='notes.png is not a JPEG or PNG'
  ):
    list(predict.predict(classifier, [digit_files[0][0], str(text)]))
  truncated = tmp_path / 'cut.png'
  truncated.write_bytes(open(digit_files[0][0], 'rb').read()[:60])
  with pytest.raises(
    input_pipeline.DatasetError, match='Cannot decode image .*cut.png'
  ):
    list(predict.predict(classifier, [str(truncated)]))
  with pytest.raises(input_pipeline.DatasetError, match='Cannot read image'):
    list(predict.predict(classifier, [str(tmp_path / 'missing.png')]))


def test_a_task_file_that_needs_its_base_says_so(tmp_path):
  params = {
    'head': {'kernel': np.ones((2, 3), np.float32)},
    'body': {'kernel': np.ones((2, 2), np.float32)},
  }
  path = str(tmp_path / 'task.npz')
  task_file.save_task_params(
    path,
    params,
    trainable=lambda p: p.startswith('head/'),
    metadata={'pretrained_path': 'gs://bucket/base.npz'},
  )
  with pytest.raises(
    checkpoint.CheckpointError,
    match=r'only the fine-tuned arrays \(1\); the other 1 come '
    'from .*gs://bucket/base.npz',
  ):
    task_file.load_task_params(path, {})


def test_predict_command_line(run, digit_files):
  paths, _ = digit_files
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'vit_jax.predict',
      f'--task={task_path(run)}',
      '--top_k=2',
      '--eval_shift=1',
      *paths[:2],
    ],
    capture_output=True,
    text=True,
    check=False,
    cwd=os.path.dirname(os.path.dirname(__file__)),
  )
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.splitlines()
  assert lines[0] == paths[0] and lines[3] == paths[1]
  assert all(line.startswith('  ') for line in lines[1:3] + lines[4:6])
  classifier = dataclasses.replace(
    predict.from_task(None, task_path(run)), eval_shift=1
  )
  (expected,) = predict.predict(classifier, paths[:1], top_k=2)
  assert lines[:3] == predict.format_prediction(expected).splitlines()


@pytest.mark.parametrize('classifier', ['token', 'gap'])
def test_a_fixed_position_embedding_as_a_learned_table_is_the_same_model(
  classifier,
):
  config = helpers.micro_model_config()
  config.classifier = classifier
  model = models.build_model(config, num_classes=10)
  images = (
    np.random.default_rng(0)
    .uniform(-1, 1, (2, helpers.CROP, helpers.CROP, 3))
    .astype(np.float32)
  )
  params = helpers.random_variables(model, images)['params']
  learned_config, learned_params = publish.plain_vit(
    config.to_dict(), params, helpers.CROP
  )
  assert learned_config['posemb'] == 'learned' and config.posemb == 'sincos2d'
  learned = models.build_model(learned_config, num_classes=10)
  chex.assert_trees_all_close(
    learned.apply({'params': learned_params}, images, train=False),
    model.apply({'params': params}, images, train=False),
    atol=1e-5,
  )
  table = learned_params['Transformer']['posembed_input']['pos_embedding']
  assert table.shape[1] == (helpers.CROP // 4) ** 2 + (classifier == 'token')


def test_fixed_position_table_rows():
  table = vit.fixed_position_table('sincos2d', (2, 3), 1, 8)
  chex.assert_shape(table, (1, 7, 8))
  np.testing.assert_array_equal(table[0, 0], 0)
  np.testing.assert_array_equal(table[0, 1:], vit.sincos2d_embedding(2, 3, 8))
  np.testing.assert_array_equal(
    vit.fixed_position_table('none', (2, 2), 0, 8), np.zeros((1, 4, 8))
  )
  with pytest.raises(ValueError, match='learned'):
    vit.fixed_position_table('learned', (2, 2), 0, 8)


def test_published_folder_holds_the_same_model(run, digit_files, tmp_path):
  workdir, config, results = run
  paths, _ = digit_files
  out = publish.publish(workdir, str(tmp_path / 'vit_micro_mnist5k'))
  assert sorted(os.listdir(out)) == [
    'README.md',
    'class_names.txt',
    'config.json',
    'model.npz',
    'model.safetensors',
    'results.json',
  ]
  task = predict.from_task(None, task_path(run))
  expected = reference_probabilities(task.model, task.params, paths, task.crop)
  published = predict.from_published(out)
  assert published.class_names == embedded.DIGIT_NAMES
  chex.assert_trees_all_close(
    reference_probabilities(
      published.model, published.params, paths, published.crop
    ),
    expected,
    atol=1e-5,
  )
  # The timm-named file holds the same weights as the Google-named one.
  npz = checkpoint.read(os.path.join(out, 'model.npz'))
  timm = checkpoint.read(
    os.path.join(out, 'model.safetensors'),
    num_heads=config.model.transformer.num_heads,
  )
  chex.assert_trees_all_close(
    inspect.flatten(timm.params), inspect.flatten(npz.params)
  )
  hub = json.loads(open(os.path.join(out, 'config.json')).read())
  model = config.model
  assert hub['model_args'] == {
    'img_size': helpers.CROP,
    'patch_size': 4,
    'embed_dim': model.hidden_size,
    'depth': model.transformer.num_layers,
    'num_heads': model.transformer.num_heads,
    'mlp_ratio': model.transformer.mlp_dim / model.hidden_size,
    'class_token': False,
    'global_pool': 'avg',
    'fc_norm': False,
    'num_classes': 10,
    'act_layer': 'gelu_tanh',
  }
  assert hub['label_names'] == list(embedded.DIGIT_NAMES)
  assert hub['vit_jax']['model']['posemb'] == 'learned'
  card = open(os.path.join(out, 'README.md')).read()
  assert f'**{100 * results["test_accuracy"]:.1f}% test accuracy**' in card
  assert COMMAND in card and 'library_name: timm' in card
  assert open(os.path.join(out, 'class_names.txt')).read().split() == list(
    embedded.DIGIT_NAMES
  )
  with pytest.raises(ConfigError, match='vit_micro_mnist5k exists'):
    publish.publish(workdir, out)


def test_the_published_folder_gets_the_permissions_mkdir_gives(run, tmp_path):
  """Not the 0700 of a temporary folder: the umask decides, as for mkdir."""
  previous = os.umask(0o027)  # Differs from 0700, and from the usual 022.
  try:
    os.makedirs(tmp_path / 'reference')
    out = publish.publish(run[0], str(tmp_path / 'published'))
  finally:
    os.umask(previous)
  expected = os.stat(tmp_path / 'reference').st_mode & 0o777
  assert expected == 0o750
  assert os.stat(out).st_mode & 0o777 == expected


def test_publishing_an_unfinished_or_unshareable_run_fails_cleanly(
  run, tmp_path, monkeypatch
):
  with pytest.raises(ConfigError, match='not the workdir of a finished'):
    publish.publish(str(tmp_path), str(tmp_path / 'out'))
  params = {'head': {'hidden': {}}}
  config = helpers.micro_model_config().to_dict()
  assert publish.timm_config(config, params, 8, ())[1].startswith('an MLP head')
  linear = {'head': {'kernel': np.zeros((2, 10))}}
  for change, reason in [
    ({'representation_size': 16}, 'a pre_logits layer'),
    ({'classifier': 'unpooled'}, "classifier='unpooled'"),
    ({'layernorm_epsilon': 1e-12}, 'LayerNorm epsilon'),
    ({'conv_stem': (8, 16)}, 'a convolutional stem'),
  ]:
    assert publish.timm_config({**config, **change}, linear, 8, ())[
      1
    ].startswith(reason)
  mixer = models.MODEL_CONFIGS['Mixer-Mini_4'].to_dict()
  reason = publish.timm_config(mixer, linear, 8, ())[1]
  assert reason.startswith('the MlpMixer architecture')
  assert publish.timm_config(
    models.MODEL_CONFIGS['Swin-T'].to_dict(), linear, 224, ()
  )[1].startswith('the SwinTransformer')
  workdir, _, results = run
  summary = {
    'model': mixer,
    'crop': 32,
    'num_classes': 10,
    'params': 1,
    'gflops': 0.1,
    'class_names': [],
    'dataset': 'cifar10',
    'finetune': 'full',
    'pretrained_path': None,
    'trained_posemb': 'learned',
  }
  card = publish.model_card('mixer', summary, results, reason)
  assert 'Mixer-Mini_4: channels_mlp_dim 512' in card
  assert 'library_name' not in card
  assert f'no timm weights: the model has {reason}' in card
  assert '`config.json`: under `vit_jax`, the model config' in card
  assert 'views shifted' not in card  # The run scored one view per image.
  over_views = {
    **results,
    'eval_views': 9,
    'test_accuracy': 0.985,
    'test_one_view_accuracy': 0.982,
    'config': {**results['config'], 'eval_shift': 1},
  }
  card = publish.model_card('mixer', summary, over_views, reason)
  assert (
    '**98.5% test accuracy** on 1,000 test images (mean of 9 views shifted '
    'by up to 1 px, `config.eval_shift=1`, as `python -m vit_jax.predict '
    '--eval_shift=1` scores; one view per image: 98.2%).'
  ) in card
  # A failure while writing (after the weights) leaves no folder behind.

  def disk_full(*unused_args):
    raise OSError('No space left on device')

  monkeypatch.setattr(publish.paths, 'write_json', disk_full)
  with pytest.raises(OSError, match='No space'):
    publish.publish(workdir, str(tmp_path / 'broken'))
  assert not os.path.exists(tmp_path / 'broken')
  assert not [p for p in os.listdir(tmp_path) if p.startswith('.tmp-')]
