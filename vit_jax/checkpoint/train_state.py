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

Damage: a step folder that is complete by name but cannot be read (a data
file deleted or overwritten, `_METADATA` cut short, the folder emptied or
made by hand) does not stop a restart. `restore(target)` logs one warning
naming the step folder and Orbax's error, tries the next older step, and
once one restores renames each damaged folder to `<step>.damaged` (or
`<step>.damaged-2`, ...), a name Orbax neither lists as a step nor cleans
up: nothing is deleted, and the run saves those steps again as it goes on.
If no step can be read, nothing is moved and `restore` raises one
CheckpointError listing each step's problem; so does `restore(target,
step=N)` for a damaged step N. A readable checkpoint that does not fit
`target` (another model) is not damage: it raises CheckpointError at once.

Multi-host: every process must call `save` and `restore` with the same steps
(Orbax synchronises the processes inside them; a process that skips a call
leaves the others waiting). Only process 0 (Orbax's default primary host)
creates and renames directories, writes the metadata and deletes old steps;
it alone moves damaged steps aside, while the others wait. Processes that
restore different steps (damage to one process's shards only) stop with a
CheckpointError rather than train on from different states.
A data-parallel state is replicated: each process holds whole copies on its
own devices, which Orbax refuses to write as `jax.Array`s (it cannot tell
them from shards of a global array), so `save` hands it host copies, written
once by process 0; arrays sharded over all processes are written shard by
shard by their holders.
"""

import contextlib
import os
import sys
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from vit_jax import paths
from vit_jax.checkpoint import inspect
from vit_jax.errors import CheckpointError

PyTree = Any

CHECKPOINT_SUBDIR = 'checkpoints'
# Where Orbax's own code lives, to tell its coroutines apart.
_ORBAX_DIR = os.path.dirname(ocp.__file__)
# Orbax's directory name for the one item of a single-item manager.
_ITEM = 'default'
# Appended to the folder of a step that cannot be read, moved aside.
DAMAGED_SUFFIX = '.damaged'


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


def _root_cause(error: BaseException) -> BaseException:
  """The innermost exception `error` was raised from or while handling:
  Orbax wraps tensorstore's read errors (which name the file and what is
  wrong with it) in one that prints a whole tensorstore spec instead."""
  seen = {id(error)}
  while True:
    inner = error.__cause__ or (
      None if error.__suppress_context__ else error.__context__
    )
    if inner is None or id(inner) in seen:
      return error
    seen.add(id(inner))
    error = inner


def _first_line(error: BaseException) -> str:
  """`Type: first line of the message` of `error`'s root cause, for a
  one-line log or error."""
  error = _root_cause(error)
  lines = str(error).strip().splitlines()
  name = type(error).__name__
  return f'{name}: {lines[0]}' if lines else name


class _Damaged(Exception):
  """A step that Orbax cannot read: missing, truncated or garbled files.

  Caught by `restore`, which then tries the next older step. Any exception
  of Orbax's reads counts: tensorstore, JSON and file errors have no
  common base class, and a real bug or a wrong target fails on every step
  alike, which `restore` reports without moving anything aside.
  """

  def __init__(self, error: Optional[BaseException] = None, reason: str = ''):
    self.reason = reason or _first_line(error)
    super().__init__(self.reason)


def _is_closed_loop_noise(unraisable: Any) -> bool:
  """Whether an unraisable exception is a late echo of a failed restore or
  save.

  When one array of a restore (or save) fails, Orbax's event loop stops
  while tensorstore still reads (writes) the others; each that completes
  then tries to call back into the closed loop, and the coroutines of the
  failed reads are collected later with their errors. Python prints either
  with a traceback, on stderr, at some later moment.
  """
  error = unraisable.exc_value
  if isinstance(error, RuntimeError) and str(error) == 'Event loop is closed':
    return True
  # A read coroutine of Orbax's collected with its (already reported)
  # error: "Exception ignored in: <coroutine ...>".
  code = getattr(unraisable.object, 'cr_code', None)
  return code is not None and _ORBAX_DIR in code.co_filename


def _silence_closed_loop_noise():
  """Drops the tracebacks of `_is_closed_loop_noise` for the rest of the
  process: they come at any moment after a failed read, which no `with`
  block around the restore could cover. Every other unraisable exception
  goes to the previous hook."""
  previous = sys.unraisablehook
  if getattr(previous, 'vit_jax_closed_loop_filter', False):
    return

  def hook(unraisable):
    if not _is_closed_loop_noise(unraisable):
      previous(unraisable)

  hook.vit_jax_closed_loop_filter = True
  sys.unraisablehook = hook


def _aside_name(step_dir: str) -> str:
  """`<step>.damaged`, or `.damaged-2`, `-3`... if taken: names that
  Orbax's step listing and its clean-up of temporary folders ignore."""
  aside = step_dir + DAMAGED_SUFFIX
  number = 1
  while paths.exists(aside):
    number += 1
    aside = f'{step_dir}{DAMAGED_SUFFIX}-{number}'
  return aside


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
    self._saving: Optional[int] = None  # The step of the latest save.
    # A failed read or write leaves late callbacks into Orbax's closed
    # event loop, at any moment after; this error reports it instead.
    _silence_closed_loop_noise()
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
    with self._save_errors():
      saved = self._manager.save(
        step, args=ocp.args.StandardSave(_host_local_to_numpy(state))
      )
    if saved:
      self._saving = step
    return saved

  def restore(
    self, target: PyTree, step: Optional[int] = None
  ) -> Optional[PyTree]:
    """Restores a saved state into the structure, shapes, devices of `target`.

    With `step=None` a damaged newest step does not stop the run: each step
    that Orbax cannot read is logged, and the next older one is tried; once
    one restores, the damaged ones are moved aside (see the module doc).

    Args:
      target: a state like the one saved, e.g. freshly initialized; optax
        namedtuples come back as in `target`. Leaves may be
        `jax.ShapeDtypeStruct`s.
      step: the step to restore; the newest that restores if None.

    Returns:
      The restored state, or None if no step was saved yet.

    Raises:
      CheckpointError: if `step` was not saved or cannot be read, or the
        checkpoint's tree structure or shapes differ from `target`'s, or
        (with `step=None`) no saved step can be read.
    """
    self._manager.wait_until_finished()
    if step is not None:
      return self._restore_named(step, target)
    problems, restored, restored_step = {}, None, None
    for candidate in reversed(self.all_steps()):
      try:
        restored = self._restore_step(candidate, target)
      except _Damaged as damage:
        problems[candidate] = damage.reason
        continue
      restored_step = candidate
      break
    self._check_processes_agree(restored_step)
    if restored_step is not None:
      self._set_aside(problems, restored_step)
      return restored
    if problems:
      listed = '; '.join(f'step {s}: {r}' for s, r in problems.items())
      raise CheckpointError(
        f'No checkpoint in {self._directory} can be restored ({listed}). '
        f'Move the damaged step folders aside to start over in this workdir, '
        f'or use a fresh workdir.'
      )
    return None

  def _step_dir(self, step: int) -> str:
    """The folder of `step`: `WORKDIR/checkpoints/<step>`."""
    return paths.join(self._directory, str(step))

  def _check_processes_agree(self, step: Optional[int]):
    """Raises CheckpointError unless every process restored `step` (None:
    none). Damage to the files of one process's shards fails the restore
    on that process alone; the processes would then train on from
    different steps."""
    if jax.process_count() == 1:
      return
    mine = -1 if step is None else step
    steps = multihost_utils.process_allgather(np.asarray(mine, np.int32))
    steps = sorted({int(s) for s in np.ravel(steps)})
    if len(steps) > 1:
      listed = ', '.join('none' if s < 0 else str(s) for s in steps)
      raise CheckpointError(
        f'The processes restored different steps ({listed}) from '
        f'{self._directory}: a step folder is damaged for some processes '
        f'only. Move the newer step folders aside, or use a fresh workdir.'
      )

  def _restore_named(self, step: int, target: PyTree) -> PyTree:
    """Restores `step`, asked for by name: no fallback to another step."""
    if step not in self.all_steps():
      raise CheckpointError(
        f'No complete checkpoint for step {step} in {self._directory}; the '
        f'saved steps are {self.all_steps()}. Pass one of them, or None for '
        f'the latest.'
      )
    try:
      return self._restore_step(step, target)
    except _Damaged as damage:
      raise CheckpointError(
        f'Cannot restore the checkpoint {self._step_dir(step)}: '
        f'{damage.reason}. Restore another step (saved: {self.all_steps()}), '
        f'or None for the newest that can be read.'
      ) from damage.__cause__

  def _restore_step(self, step: int, target: PyTree) -> PyTree:
    """Restores `step` into `target`.

    Raises:
      _Damaged: Orbax cannot read the step's metadata or arrays.
      CheckpointError: the step is intact but does not fit `target`; a
        different model is not damage, so no older step is tried.
    """
    # Checked first: Orbax takes a step folder without the item folder for
    # a checkpoint of several items, and then reads every step that way.
    if not paths.exists(paths.join(self._step_dir(step), _ITEM)):
      raise _Damaged(reason=f'no {_ITEM}/ folder: it holds no saved state')
    try:
      stored = self._manager.metadata(step).item_metadata
    except Exception as e:  # Any failure to read is damage; see _Damaged.
      raise _Damaged(e) from e
    self._check_fits(self._step_dir(step), stored, target)
    try:
      return self._manager.restore(step, args=ocp.args.StandardRestore(target))
    except Exception as e:
      raise _Damaged(e) from e

  def _check_fits(self, step_dir: str, stored: PyTree, target: PyTree):
    """Raises CheckpointError naming paths where disk and `target` differ."""
    diff = inspect.compare(_path_shapes(stored), _path_shapes(target))
    if not diff.ok:
      raise CheckpointError(
        f'The checkpoint {step_dir} does not fit the restore target (the '
        f'"model" below):\n{diff.report()}\nBuild the target with the model '
        f'and optimizer configuration of the run that wrote the checkpoint, '
        f'or use a fresh workdir.'
      )

  def _set_aside(self, problems: Mapping[int, str], restored_step: int):
    """Logs one warning per damaged step of `problems` (step: why) and has
    process 0 rename its folder to `<step>.damaged`; then makes Orbax list
    the steps anew, so that `save` may write those steps again."""
    for step, reason in sorted(problems.items()):
      step_dir = self._step_dir(step)
      if jax.process_index() == 0:
        aside = _aside_name(step_dir)
        paths.rename(step_dir, aside)
        moved = f'moved it aside to {aside}'
      else:
        moved = 'process 0 moves it aside'
      logging.warning(
        'Skipped the damaged checkpoint %s (%s); %s and resumed from step %d.',
        step_dir,
        reason,
        moved,
        restored_step,
      )
    if not problems:
      return
    if jax.process_count() > 1:  # The others list the steps after the move.
      multihost_utils.sync_global_devices('vit_jax: damaged steps moved')
    self._manager.reload()

  def wait_until_finished(self):
    """Blocks until a pending asynchronous save is on disk; a
    CheckpointError if it failed."""
    with self._save_errors():
      self._manager.wait_until_finished()

  def check_for_errors(self):
    """A CheckpointError if an asynchronous save failed since the last
    call (a full disk), without waiting for one in progress: the loop asks
    at each report, so the failure stops the run when it happens."""
    with self._save_errors():
      self._manager.check_for_errors()

  @contextlib.contextmanager
  def _save_errors(self) -> Iterator[None]:
    """Turns the failure of the save of `self._saving` (raised by Orbax at
    its next call) into one CheckpointError naming the step, the reason and
    the latest intact step."""
    try:
      yield
    except Exception as e:  # noqa: BLE001 (Orbax's errors share no base)
      if isinstance(e, CheckpointError):
        raise
      self._manager.reload()
      latest = self._manager.latest_step()
      kept = (
        f'the checkpoint of step {latest} is intact'
        if latest is not None
        else 'no earlier checkpoint was saved'
      )
      raise CheckpointError(
        f'Cannot write the checkpoint of step {self._saving} in '
        f'{self._directory} ({_first_line(e)}); {kept}. Free space (or fix '
        'the permissions) and run the same command again to resume.'
      ) from e

  def close(self):
    """Finishes pending saves and deletions and releases Orbax's threads;
    a CheckpointError if a save failed."""
    with self._save_errors():
      self._manager.close()

  def __enter__(self) -> 'TrainCheckpointer':
    return self

  def __exit__(self, *exc_info):
    self.close()
