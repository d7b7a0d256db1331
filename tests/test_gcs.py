"""gs:// paths end to end, against a GCS API emulator on localhost.

The module's fixture serves `gs://test-bucket` from gcp-storage-emulator and
points this process (and the training processes it starts) at it; the
project's code runs unchanged, through `vit_jax.paths`, gcsfs and Orbax's
tensorstore, as on a TPU VM with a real bucket.
"""

import io
import json
import os
import signal
import subprocess
import sys

import chex
import gcsfs
import numpy as np
from PIL import Image
import pytest

from configs import augreg as augreg_config
from tests import gcs_emulator
from tests import helpers
from tests import test_augreg
from vit_jax import checkpoint
from vit_jax import input_pipeline
from vit_jax import models
from vit_jax import paths
from vit_jax import predict
from vit_jax import publish
from vit_jax import results
from vit_jax.checkpoint import train_state
from vit_jax.errors import CheckpointError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = f'gs://{gcs_emulator.BUCKET}'
CROP = 8


def test_paths_write_read_list_and_remove_objects(emulator):
  del emulator
  folder = f'{BUCKET}/paths'
  assert paths.is_remote(folder) and not paths.is_remote('/tmp/x')
  assert os.environ['EPATH_USE_TF'] == 'false'  # gcsfs, not tf.io.gfile.
  assert not paths.exists(folder) and paths.listdir(folder) == []
  paths.write_json(paths.join(folder, 'a.json'), {'x': 1})
  paths.write_text(paths.join(folder, 'sub', 'b.txt'), 'first')
  paths.write_text(paths.join(folder, 'sub', 'b.txt'), 'second')  # Replaced.
  assert paths.listdir(folder) == ['a.json', 'sub']
  assert paths.is_dir(paths.join(folder, 'sub'))
  assert paths.read_json(paths.join(folder, 'a.json')) == {'x': 1}
  assert paths.read_text(paths.join(folder, 'sub', 'b.txt')) == 'second'
  assert paths.size(paths.join(folder, 'sub', 'b.txt')) == len('second')
  paths.remove_tree(folder)
  assert not paths.exists(paths.join(folder, 'a.json'))


def test_listings_see_what_another_process_wrote(emulator):
  """A listing made earlier in this process does not hide objects another
  process (here: a client of its own) writes afterwards, such as the
  newer checkpoints of a resumed run."""
  del emulator
  folder = f'{BUCKET}/shared'
  paths.write_text(paths.join(folder, 'first.txt'), '1')
  assert paths.listdir(folder) == ['first.txt']
  other = gcsfs.GCSFileSystem(skip_instance_cache=True)
  other.pipe_file(f'{folder}/second.txt'.removeprefix('gs://'), b'2')
  assert paths.listdir(folder) == ['first.txt', 'second.txt']
  assert paths.exists(paths.join(folder, 'second.txt'))


@pytest.fixture(scope='module')
def micro_params():
  """Random parameters of the tests' two-layer ViT-Micro_4 with learned
  position embeddings (as timm's files need), 1000 classes."""
  config = helpers.micro_model_config()
  config.posemb = 'learned'
  model = models.build_model(config, num_classes=1000)
  images = np.zeros((1, CROP, CROP, 3), np.float32)
  return helpers.random_variables(model, images)['params']


def test_checkpoint_files_in_the_bucket(emulator, micro_params):
  del emulator
  params = micro_params
  heads = helpers.micro_model_config().transformer.num_heads
  for name in ('ckpt.npz', 'ckpt.safetensors'):
    path = f'{BUCKET}/files/{name}'
    checkpoint.save(path, params, num_heads=heads)
    chex.assert_trees_all_close(checkpoint.load(path, num_heads=heads), params)
  missing = f'{BUCKET}/files/absent.npz'
  with pytest.raises(CheckpointError, match=f'^{missing}: no such file'):
    checkpoint.load(missing)
  paths.write_bytes(f'{BUCKET}/files/cut.npz', b'PK\x03\x04 cut short')
  with pytest.raises(CheckpointError, match='not a readable .npz archive'):
    checkpoint.load(f'{BUCKET}/files/cut.npz')


def test_augreg_index_in_the_bucket_selects_the_checkpoint(emulator, tmp_path):
  """configs/augreg.py's default pretrained_dir is a bucket: its index.csv
  is read from there."""
  del emulator
  test_augreg.write_index(tmp_path)
  directory = f'{BUCKET}/augreg'
  paths.copy_file(str(tmp_path / 'index.csv'), f'{directory}/index.csv')
  config = augreg_config.get_config('B_16,digits')
  config.pretrained_dir = directory
  assert results.pretrained_path(config) == (
    f'{directory}/{test_augreg.B16_BEST}.npz'
  )


def _upload_tree(local_root: str, remote_root: str) -> None:
  for directory, _, names in os.walk(local_root):
    for name in names:
      local = os.path.join(directory, name)
      remote = paths.join(remote_root, os.path.relpath(local, local_root))
      paths.copy_file(local, remote)


def _split_images(source, split: str):
  """The split's decoded images and labels, in order."""
  examples = source.examples(split).map(
    lambda e: {'image': source.decode(e['image']), 'label': e['label']}
  )
  return [(e['image'], e['label']) for e in examples.as_numpy_iterator()]


def test_image_folder_in_the_bucket_equals_the_local_one(emulator, tmp_path):
  del emulator
  colours = {'cat': (250, 10, 10), 'dog': (10, 10, 250)}
  for split in ('train', 'test'):
    for name, colour in colours.items():
      os.makedirs(tmp_path / split / name)
      for index, size in enumerate([(9, 7), (12, 12)]):
        Image.new('RGB', size, colour).save(
          tmp_path / split / name / f'{index}.png'
        )
  remote = f'{BUCKET}/folders/pets'
  _upload_tree(str(tmp_path), remote)
  local_source = input_pipeline.get_source(str(tmp_path))
  remote_source = input_pipeline.get_source(remote)
  assert remote_source.info.class_names == ('cat', 'dog')
  assert remote_source.info.split_sizes == local_source.info.split_sizes
  for split in ('train', 'test'):
    local, bucket = (
      _split_images(local_source, split),
      _split_images(remote_source, split),
    )
    assert len(bucket) == 4
    chex.assert_trees_all_equal(bucket, local)


def _main(*flags: str) -> subprocess.Popen:
  """`python -m vit_jax.main` on the micro model, stderr piped."""
  return subprocess.Popen(
    [
      sys.executable,
      '-m',
      'vit_jax.main',
      f'--config={REPO}/configs/vit.py:micro4,mnist5k',
      '--config.model.transformer.num_layers=2',
      '--config.model.posemb=learned',
      f'--config.pp.crop={CROP}',
      '--config.batch=32',
      '--config.accum_steps=1',
      '--config.batch_eval=256',
      '--config.warmup_steps=1',
      '--config.progress_every=1',
      '--config.checkpoint_every=3',
      *flags,
    ],
    cwd=REPO,
    env=helpers.cpu_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


@pytest.mark.slow
def test_training_in_the_bucket_is_killed_resumes_and_publishes(
  emulator, micro_params, tmp_path
):
  """The TPU VM command: a Google-format checkpoint in the bucket, a
  gs:// workdir; the run is killed, resumes from the bucket, and the task
  file it leaves there is published to, and served from, the bucket."""
  del emulator
  local_npz = str(tmp_path / 'ViT-Micro_4.npz')
  checkpoint.save(local_npz, micro_params)
  pretrained_dir = f'{BUCKET}/imagenet21k'
  paths.copy_file(local_npz, paths.join(pretrained_dir, 'ViT-Micro_4.npz'))
  workdir = f'{BUCKET}/runs/a'
  flags = (f'--config.pretrained_dir={pretrained_dir}', f'--workdir={workdir}')

  # Killed at step 7: the save of step 3 has finished (a save waits for
  # the one before it), the save of step 6 may not have.
  first = _main(*flags, '--config.total_steps=100000')
  # SIGKILL: no handler runs, as when a machine goes away.
  stderr = helpers.signal_on_line(first, 'step 7/100000', signal.SIGKILL)
  assert first.returncode == -signal.SIGKILL, stderr[-3000:]
  with train_state.TrainCheckpointer(workdir) as checkpointer:
    saved = checkpointer.all_steps()
  assert saved and set(saved) <= {3, 6}, saved

  second = _main(*flags, '--config.total_steps=9')
  stdout, stderr = second.communicate(timeout=300)
  assert second.returncode == 0, stderr[-3000:]
  assert f'Resuming from step {saved[-1]} in {workdir}/checkpoints' in stderr
  assert f'results in {workdir}/results.json' in stdout

  results = paths.read_json(paths.join(workdir, 'results.json'))
  assert results['resumed_from_step'] == saved[-1]
  assert results['test_examples'] == 1000
  assert results['task_file'] == 'task_params.npz'
  task_path = f'{workdir}/task_params.npz'
  assert results['task_file_sha256'] == paths.sha256(task_path)
  lines = paths.read_text(paths.join(workdir, 'metrics.jsonl')).splitlines()
  records = [json.loads(line) for line in lines]
  train_steps = [r['step'] for r in records if 'train/loss' in r]
  assert train_steps == list(range(1, 10))  # Each step once, killed or not.
  listed = paths.listdir(workdir)
  assert {'checkpoints', 'config.json', 'task_params.npz'} <= set(listed)
  assert any(name.startswith('events.out.tfevents') for name in listed)
  with train_state.TrainCheckpointer(workdir) as checkpointer:
    assert checkpointer.latest_step() == 9

  out = f'{BUCKET}/models/a'
  publish.publish(workdir, out)
  assert set(paths.listdir(out)) >= {'config.json', 'model.npz', 'README.md'}
  image = io.BytesIO()
  Image.new('L', (28, 28), 255).save(image, format='PNG')
  paths.write_bytes(f'{BUCKET}/inputs/white.png', image.getvalue())
  served = predict.from_published(out)
  (prediction,) = predict.predict(served, [f'{BUCKET}/inputs/white.png'])
  from_task = predict.from_task(
    paths.join(pretrained_dir, 'ViT-Micro_4.npz'), task_path
  )
  (same,) = predict.predict(from_task, [f'{BUCKET}/inputs/white.png'])
  assert prediction.path == f'{BUCKET}/inputs/white.png'
  assert [c for c, _ in prediction.top] == [c for c, _ in same.top]
  np.testing.assert_allclose(
    [p for _, p in prediction.top], [p for _, p in same.top], rtol=1e-5
  )
