"""Task files: only the trained leaves, checked against their base model."""

import os
import re

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import trainable as trainable_lib
from vit_jax.checkpoint import inspect
from vit_jax.checkpoint import task_file
from vit_jax.errors import CheckpointError
from vit_jax.errors import OutputError

ADAPTER = 'Transformer/encoderblock_0/adapter'


def matching(patterns: str) -> trainable_lib.Trainable:
  """The predicate of comma-separated path regexes."""
  return trainable_lib.matcher(trainable_lib.parse_patterns(patterns))


TRAINABLE = matching('head/.*,.*/adapter/.*')


def base_params(seed: int = 0) -> dict:
  """A tiny ViT-like tree: embedding, one MLP, a 10-class head."""
  rng = np.random.default_rng(seed)
  return inspect.unflatten(
    {
      'embedding/kernel': rng.normal(size=(2, 2, 3, 4)).astype(np.float32),
      'embedding/bias': rng.normal(size=(4,)).astype(np.float32),
      'Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel': rng.normal(
        size=(4, 8)
      ).astype(np.float32),
      'head/kernel': rng.normal(size=(4, 10)).astype(np.float32),
      'head/bias': np.zeros(10, np.float32),
    }
  )


def fine_tuned(base: dict) -> dict:
  """`base` with a new 5-class head and injected adapter leaves."""
  flat = inspect.flatten(base)
  flat.update(
    {
      'head/kernel': np.full((4, 5), 0.5, np.float32),
      'head/bias': np.arange(5, dtype=np.float32),
      f'{ADAPTER}/down/kernel': np.ones((4, 2), np.float32),
      f'{ADAPTER}/scale': jnp.full((2,), 0.25, jnp.bfloat16),
    }
  )
  return inspect.unflatten(flat)


@pytest.fixture(name='saved')
def fixture_saved(tmp_path):
  """The path of a task file of `fine_tuned(base_params())`."""
  path = str(tmp_path / 'task.npz')
  task_file.save_task_params(path, fine_tuned(base_params()), TRAINABLE)
  return path


def test_round_trip_gives_the_fine_tuned_tree(saved):
  with np.load(saved, allow_pickle=False) as data:
    keys = set(data.files)
  assert keys == {
    'head/kernel',
    'head/bias',
    f'{ADAPTER}/down/kernel',
    f'{ADAPTER}/scale',
    task_file.META_KEY,
  }

  merged = task_file.load_task_params(saved, base_params())
  chex.assert_trees_all_equal(merged, fine_tuned(base_params()))
  assert merged['Transformer']['encoderblock_0']['adapter']['scale'].dtype == (
    jnp.bfloat16
  )


def test_patterns_match_whole_paths_and_explicit_base(tmp_path):
  base = base_params()
  params = fine_tuned(base)
  params['header'] = {'kernel': np.ones(3, np.float32)}
  base['header'] = params['header']
  path = str(tmp_path / 'task.npz')

  # 'head/.*' selects 'head/...' but not 'header/...'.
  task_file.save_task_params(
    path, params, matching(f'head/.*,{ADAPTER}/.*'), base_params=base
  )
  with np.load(path, allow_pickle=False) as data:
    assert not any(key.startswith('header') for key in data.files)
    assert 'head/kernel' in data.files

  # The base's own 10-class head is replaced, so its shape is not compared.
  merged = task_file.load_task_params(path, base)
  chex.assert_trees_all_equal(merged['head'], params['head'])


def test_trained_frozen_leaf_is_refused(tmp_path):
  base = base_params()
  params = fine_tuned(base)
  params['embedding']['bias'] = params['embedding']['bias'] + 1
  with pytest.raises(
    CheckpointError,
    match=r'differ from base_params.*'
    r"\['embedding/bias'\]",
  ):
    task_file.save_task_params(
      str(tmp_path / 'task.npz'), params, TRAINABLE, base_params=base
    )


def test_selecting_nothing_is_refused(tmp_path):
  with pytest.raises(CheckpointError, match='selects none'):
    task_file.save_task_params(
      str(tmp_path / 'task.npz'), base_params(), matching('decoder/.*')
    )


def test_base_with_other_values_fails_the_fingerprint_unless_not_strict(saved):
  other = base_params(seed=1)
  with pytest.raises(CheckpointError) as error:
    task_file.load_task_params(saved, other)
  message = str(error.value)
  assert saved in message and 'different base checkpoint' in message
  assert len(re.findall(r'\b[0-9a-f]{12}\b', message)) == 2

  merged = task_file.load_task_params(saved, other, strict=False)
  chex.assert_trees_all_equal(merged['embedding'], other['embedding'])
  chex.assert_trees_all_equal(merged['head'], fine_tuned(other)['head'])


def test_base_with_other_shapes_lists_paths(saved):
  flat = inspect.flatten(base_params())
  flat['embedding/kernel'] = np.zeros((4, 4, 3, 4), np.float32)
  del flat['embedding/bias']
  flat['cls'] = np.zeros((1, 1, 4), np.float32)
  with pytest.raises(CheckpointError) as error:
    task_file.load_task_params(saved, inspect.unflatten(flat), strict=False)
  message = str(error.value)
  assert saved in message
  assert 'missing from the base_params:\n  embedding/bias' in message
  assert 'not in the recorded base:\n  cls' in message
  assert (
    '(base_params vs recorded base):\n'
    '  embedding/kernel: (4, 4, 3, 4) vs (2, 2, 3, 4)'
  ) in message


def test_missing_file(tmp_path):
  path = str(tmp_path / 'absent.npz')
  with pytest.raises(CheckpointError, match=f'{re.escape(path)}: no such'):
    task_file.load_task_params(path, base_params())


@pytest.mark.parametrize('damage', ['truncate', 'garbage'])
def test_corrupt_file(saved, damage):
  with open(saved, 'rb') as f:
    data = f.read()
  with open(saved, 'wb') as f:
    f.write(data[: len(data) // 2] if damage == 'truncate' else b'\x93NUMPY!!')
  with pytest.raises(CheckpointError, match=re.escape(saved)):
    task_file.load_task_params(saved, base_params())


def test_not_a_task_file(tmp_path):
  full = str(tmp_path / 'full.npz')
  np.savez(full, **inspect.flatten(base_params()))
  with pytest.raises(
    CheckpointError,
    match=f'{re.escape(full)}: not a task file.*vit_jax.checkpoint.load',
  ):
    task_file.load_task_params(full, base_params())
  single = str(tmp_path / 'single.npy')
  np.save(single, np.zeros(3))
  with pytest.raises(CheckpointError, match='single array'):
    task_file.load_task_params(single, base_params())


def test_writes_atomically_without_leftovers(saved, monkeypatch):
  task_file.save_task_params(saved, fine_tuned(base_params()), TRAINABLE)
  assert os.listdir(os.path.dirname(saved)) == ['task.npz']

  def crash(unused_fd):  # The bytes are in the temporary file by now.
    raise OSError('simulated crash before the data reached the disk')

  with open(saved, 'rb') as f:
    before = f.read()
  monkeypatch.setattr(os, 'fsync', crash)
  with pytest.raises(OutputError, match=f'Cannot write {saved}: simulated'):
    task_file.save_task_params(saved, base_params(), trainable_lib.is_head)
  assert os.listdir(os.path.dirname(saved)) == ['task.npz']
  with open(saved, 'rb') as f:
    assert f.read() == before
