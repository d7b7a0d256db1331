"""Resumable training checkpoints: resume equals no restart, atomic, clear."""

import os

import chex
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
import pytest

from vit_jax.checkpoint import train_state
from vit_jax.errors import CheckpointError

# AdamW's state mixes namedtuple types (ScaleByAdamState, EmptyState, ...), so
# restoring it checks that optax's structure comes back, not just the arrays.
TX = optax.adamw(learning_rate=0.05, weight_decay=1e-3)
INPUTS, HIDDEN = 4, 8


def init_state(seed: int = 0) -> dict:
  """A 2-layer MLP's training state, with its RNG key as uint32 data."""
  kernel0_rng, kernel1_rng, rng = jax.random.split(jax.random.PRNGKey(seed), 3)
  params = {
    'Dense_0': {
      'kernel': jax.random.normal(kernel0_rng, (INPUTS, HIDDEN)) / 2,
      'bias': jnp.zeros(HIDDEN),
    },
    'Dense_1': {
      'kernel': jax.random.normal(kernel1_rng, (HIDDEN, 1)) / 3,
      'bias': jnp.zeros(1),
    },
  }
  return {'params': params, 'opt_state': TX.init(params), 'step': 0, 'rng': rng}


@jax.jit
def update(params, opt_state, rng):
  """One AdamW step on a fresh random batch, with dropout; both use `rng`."""
  rng, batch_rng, dropout_rng = jax.random.split(rng, 3)
  x = jax.random.normal(batch_rng, (16, INPUTS))
  y = jnp.sin(x.sum(axis=-1, keepdims=True))

  def loss(p):
    h = jax.nn.relu(x @ p['Dense_0']['kernel'] + p['Dense_0']['bias'])
    h = h * jax.random.bernoulli(dropout_rng, 0.8, h.shape) / 0.8
    prediction = h @ p['Dense_1']['kernel'] + p['Dense_1']['bias']
    return jnp.mean((prediction - y) ** 2)

  updates, opt_state = TX.update(jax.grad(loss)(params), opt_state, params)
  return optax.apply_updates(params, updates), opt_state, rng


def train(state: dict, until: int, checkpointer=None, every: int = 2) -> dict:
  """Trains up to step `until`, saving every `every` steps if asked to."""
  while state['step'] < until:
    params, opt_state, rng = update(
      state['params'], state['opt_state'], state['rng']
    )
    state = {
      'params': params,
      'opt_state': opt_state,
      'step': state['step'] + 1,
      'rng': rng,
    }
    if checkpointer is not None and state['step'] % every == 0:
      checkpointer.save(state['step'], state)
  return state


def test_resumed_run_matches_uninterrupted_run(tmp_path):
  straight = train(init_state(), until=10)

  with train_state.TrainCheckpointer(tmp_path) as checkpointer:
    assert checkpointer.restore(init_state()) is None
    # Step 7 is computed but never saved: the restart must redo it.
    train(init_state(), until=7, checkpointer=checkpointer)

  # A restarted process: new objects, same workdir.
  with train_state.TrainCheckpointer(tmp_path) as checkpointer:
    resumed = checkpointer.restore(init_state())
    assert resumed['step'] == 6
    assert isinstance(resumed['step'], int)
    resumed = train(resumed, until=10, checkpointer=checkpointer)

  chex.assert_trees_all_equal(resumed, straight)
  chex.assert_trees_all_equal_structs(
    resumed['opt_state'], straight['opt_state']
  )


def test_fresh_workdir_restores_none(tmp_path):
  with train_state.TrainCheckpointer(tmp_path / 'new') as checkpointer:
    assert checkpointer.latest_step() is None
    assert checkpointer.restore(init_state()) is None
  assert os.path.isdir(tmp_path / 'new' / 'checkpoints')


def test_keeps_only_last_n_steps(tmp_path):
  state = init_state()
  with train_state.TrainCheckpointer(tmp_path, keep=2) as checkpointer:
    for step in (1, 2, 3, 4):
      assert checkpointer.save(step, {**state, 'step': step})
    checkpointer.wait_until_finished()
    assert checkpointer.all_steps() == [3, 4]
    assert checkpointer.restore(state, step=3)['step'] == 3
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['3', '4']


def test_unfinished_step_directory_is_ignored_and_removed(tmp_path):
  with train_state.TrainCheckpointer(tmp_path) as checkpointer:
    checkpointer.save(2, {**init_state(), 'step': 2})
  # What a crash while writing step 4 leaves behind: Orbax's temporary name.
  unfinished = (
    tmp_path / 'checkpoints' / ('4' + ocp.path.atomicity.TMP_DIR_SUFFIX)
  )
  (unfinished / 'default').mkdir(parents=True)
  (unfinished / 'default' / 'half_written').write_bytes(b'\0' * 10)

  with train_state.TrainCheckpointer(tmp_path) as checkpointer:
    assert checkpointer.latest_step() == 2
    assert checkpointer.restore(init_state())['step'] == 2
    assert not unfinished.exists()
    # The crashed step can be saved again.
    assert checkpointer.save(4, {**init_state(), 'step': 4})
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '4']


def test_mismatched_target_names_paths_and_directory(tmp_path):
  with train_state.TrainCheckpointer(tmp_path) as checkpointer:
    checkpointer.save(1, init_state())
    target = init_state()
    target['params']['Dense_1']['kernel'] = jnp.zeros((HIDDEN, 3))
    target['params']['extra'] = jnp.zeros(2)
    del target['params']['Dense_0']['bias']
    with pytest.raises(CheckpointError) as error:
      checkpointer.restore(target)
  message = str(error.value)
  assert os.path.join(str(tmp_path), 'checkpoints', '1') in message
  assert 'missing from the checkpoint:\n  params/extra\n' in message
  assert 'not in the model:\n  params/Dense_0/bias\n' in message
  assert 'params/Dense_1/kernel: (8, 1) vs (8, 3)' in message


def test_unknown_step_lists_saved_steps(tmp_path):
  with train_state.TrainCheckpointer(tmp_path) as checkpointer:
    checkpointer.save(3, init_state())
    with pytest.raises(CheckpointError, match=r'step 5 .* are \[3\]'):
      checkpointer.restore(init_state(), step=5)
