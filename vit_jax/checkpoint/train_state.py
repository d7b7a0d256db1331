"""Resumable training checkpoints, written with Orbax.

A run saves its whole training state (parameters, optimizer state, step: any
pytree) every few steps into `WORKDIR/checkpoints/<step>/`, keeping
the last few. A process that starts in the same workdir builds a fresh state,
calls `restore(fresh_state)` and carries on from the latest step; in a fresh
workdir `restore` returns None and the run starts from scratch:

  with TrainCheckpointer(workdir) as checkpointer:
    state = init_state()
    state = checkpointer.restore(state) or state
    for step in range(state['step'] + 1, num_steps + 1):
      state = train_step(state, next(batches))
      if step % every == 0:
        checkpointer.save(step, state)

Atomicity: Orbax writes a step into `<step>.orbax-checkpoint-tmp/` and renames
it to `<step>/` only once every file is on disk (on object stores such as GCS
it writes a `commit_success.txt` marker instead). A crash mid-write thus leaves
an unfinished directory that `latest_step` and `restore` never consider; it is
deleted when the next `TrainCheckpointer` opens the directory.

Multi-host: every process must call `save` and `restore` with the same steps
(Orbax synchronises the processes inside them; a process that skips a call
leaves the others waiting). Only process 0 (Orbax's default primary host)
creates and renames directories, writes the metadata and deletes old steps.
A data-parallel state is replicated: each process holds whole copies on its
own devices, which Orbax refuses to write as `jax.Array`s (it cannot tell
them from shards of a global array), so `save` hands it host copies, written
once by process 0; arrays sharded over all processes are written shard by
shard by their holders.
"""

import os
from typing import Any, Optional, Sequence, Union

import jax
import numpy as np
import orbax.checkpoint as ocp

from vit_jax import paths
from vit_jax.checkpoint import inspect
from vit_jax.errors import CheckpointError

PyTree = Any

CHECKPOINT_SUBDIR = 'checkpoints'
# Orbax's directory name for the one item of a single-item manager.
_ITEM = 'default'


def _shape(leaf: Any) -> tuple:
  """Shape of an array, `jax.ShapeDtypeStruct`, Orbax metadata or scalar."""
  return tuple(leaf.shape) if hasattr(leaf, 'shape') else np.shape(leaf)


def _host_local_to_numpy(tree: PyTree) -> PyTree:
  """`tree` with the whole-on-this-host `jax.Array`s of a multi-host run as
  NumPy arrays, the form Orbax writes for them; as is with one process."""
  if jax.process_count() == 1:
    return tree
  return jax.tree.map(
    lambda leaf: (
      np.asarray(leaf)
      if isinstance(leaf, jax.Array) and leaf.is_fully_addressable
      else leaf
    ),
    tree,
  )


def _path_shapes(tree: PyTree) -> dict:
  """Maps each leaf's '/'-joined path ('params/head/kernel') to its shape."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {
    jax.tree_util.keystr(path, simple=True, separator='/'): _shape(leaf)
    for path, leaf in leaves
  }


class TrainCheckpointer:
  """Saves and restores training states under `WORKDIR/checkpoints/`.

  A thin layer over `orbax.checkpoint.CheckpointManager` that keeps the last
  `keep` steps, returns None when there is nothing to resume from, and raises
  `CheckpointError`s that name the offending paths.
  Use it as a context manager (or call `close`) so that asynchronous saves and
  deletions finish before the process exits.
  """

  def __init__(
    self,
    workdir: Union[str, os.PathLike],
    keep: int = 3,
    asynchronous: bool = True,
  ):
    """Opens (creating if needed) `workdir/checkpoints`.

    Args:
      workdir: the run's working directory.
      keep: how many of the most recent steps to keep; older ones are deleted.
      asynchronous: if True, `save` returns once the arrays are copied off the
        accelerator and the files are written in a background thread, so
        training is not held up by the disk.
    """
    if keep < 1:
      raise ValueError(f'keep must be at least 1, got {keep}.')
    self._directory = paths.join(workdir, CHECKPOINT_SUBDIR)
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(_ITEM, ocp.args.StandardSave)
    registry.add(_ITEM, ocp.args.StandardRestore)
    options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.LatestN(n=keep),
      # Deletes directories left by a save that crashed, so that the step
      # can be saved again after the restart.
      cleanup_tmp_directories=True,
      enable_async_checkpointing=asynchronous,
    )
    self._manager = ocp.CheckpointManager(
      self._directory, options=options, handler_registry=registry
    )

  @property
  def directory(self) -> str:
    """The directory holding one subdirectory per saved step."""
    return self._directory

  def all_steps(self) -> Sequence[int]:
    """The steps of all complete checkpoints, in increasing order."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    """The most recent complete step, or None if none was saved."""
    return self._manager.latest_step()

  def save(self, step: int, state: PyTree) -> bool:
    """Saves `state` as `step`, then deletes steps beyond the last `keep`.

    Args:
      step: the training step `state` belongs to; larger than any saved step.
      state: a pytree of arrays and scalars, e.g. params, optax state and
        step.

    Returns:
      Whether a checkpoint was written: False if `step` is not larger than the
      latest saved step.
    """
    return self._manager.save(
      step, args=ocp.args.StandardSave(_host_local_to_numpy(state))
    )

  def restore(
    self, target: PyTree, step: Optional[int] = None
  ) -> Optional[PyTree]:
    """Restores a saved state into the structure, shapes, devices of `target`.

    Args:
      target: a state like the one saved, e.g. freshly initialized; optax
        namedtuples come back as in `target`. Leaves may be
        `jax.ShapeDtypeStruct`s.
      step: the step to restore; the latest if None.

    Returns:
      The restored state, or None if no step was saved yet.

    Raises:
      CheckpointError: if `step` was not saved, or the checkpoint's tree
        structure or shapes differ from `target`'s, or Orbax cannot read it.
    """
    self._manager.wait_until_finished()
    if step is None:
      step = self.latest_step()
      if step is None:
        return None
    if step not in self.all_steps():
      raise CheckpointError(
        f'No complete checkpoint for step {step} in {self._directory}; the '
        f'saved steps are {self.all_steps()}. Pass one of them, or None for '
        f'the latest.'
      )
    step_dir = paths.join(self._directory, str(step))
    self._check_fits(step, step_dir, target)
    try:
      return self._manager.restore(step, args=ocp.args.StandardRestore(target))
    except (ValueError, KeyError, TypeError, OSError) as e:
      raise CheckpointError(
        f'Cannot restore the checkpoint {step_dir}: {e}'
      ) from e

  def _check_fits(self, step: int, step_dir: str, target: PyTree):
    """Raises CheckpointError naming paths where disk and `target` differ."""
    stored = self._manager.metadata(step).item_metadata
    diff = inspect.compare(_path_shapes(stored), _path_shapes(target))
    if not diff.ok:
      raise CheckpointError(
        f'The checkpoint {step_dir} does not fit the restore target (the '
        f'"model" below):\n{diff.report()}\nBuild the target with the model '
        f'and optimizer configuration of the run that wrote the checkpoint, '
        f'or use a fresh workdir.'
      )

  def wait_until_finished(self):
    """Blocks until a pending asynchronous save is on disk; raises its error."""
    self._manager.wait_until_finished()

  def close(self):
    """Finishes pending saves and deletions and releases Orbax's threads."""
    self._manager.close()

  def __enter__(self) -> 'TrainCheckpointer':
    return self

  def __exit__(self, *exc_info):
    self.close()
