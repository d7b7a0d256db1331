"""A run's lifecycle around the training loop: when it reports, evaluates
and saves, whether it may resume, when it stops, and what it says then.

`Intervals` validates the loop's intervals up front and says what is due
at each step. `check_restart` refuses a workdir that holds a run with
another config. `Monitor` turns the metrics of the steps since the last
report into a progress line and TensorBoard scalars, and stops the run at
the first NaN/inf (`divergence_error`). `StopSignals` turns SIGTERM
(a preempted TPU VM) or Ctrl-C into a stop before the first step or at the
end of the current one; `save_on_stop` saves that step and says where.
"""

import contextlib
import dataclasses
import math
import signal
import threading
from typing import AbstractSet, Any, Dict, Iterator, List, Optional, Tuple

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from vit_jax import engine as engine_lib
from vit_jax import metrics as metrics_lib
from vit_jax import paths
from vit_jax import results as results_lib
from vit_jax import steps
from vit_jax.checkpoint import train_state
from vit_jax.errors import ConfigError
from vit_jax.errors import Interrupted


@dataclasses.dataclass(frozen=True)
class Due:
  """What the loop does after a step besides training.

  Attributes:
    last: the run's final step.
    report: check the metrics for NaN/inf, log progress, write scalars.
    evaluate: evaluate on the test split.
    save: save a checkpoint.
  """

  last: bool
  report: bool
  evaluate: bool
  save: bool


# Each interval's smallest value, and what it means.
_INTERVAL_RANGES = {
  'total_steps': (1, 'the run trains at least one step'),
  'progress_every': (
    1,
    'steps between progress lines, which also check the loss for NaN/inf',
  ),
  'eval_every': (0, '0 evaluates at the end only'),
  'checkpoint_every': (0, '0 saves no checkpoint'),
}


@dataclasses.dataclass(frozen=True)
class Intervals:
  """The loop's length and intervals, in steps.

  Attributes:
    total_steps: steps of the run (>= 1).
    progress_every: steps between progress reports (>= 1).
    eval_every: steps between evaluations (0: at the end only).
    checkpoint_every: steps between checkpoints, and one at the end (0:
      none).
  """

  total_steps: int
  progress_every: int
  eval_every: int
  checkpoint_every: int

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'Intervals':
    """The intervals of `config`; a ConfigError naming the first key out
    of range."""
    for key, (minimum, meaning) in _INTERVAL_RANGES.items():
      value = config[key]
      if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
          f'config.{key}={value!r} must be an integer number of steps.'
        )
      if value < minimum:
        raise ConfigError(
          f'config.{key}={value} must be >= {minimum} ({meaning}).'
        )
    return cls(**{key: config[key] for key in _INTERVAL_RANGES})

  def due(self, step: int) -> Due:
    """What is due after `step` (1-based)."""
    last = step == self.total_steps
    evaluate = last or (self.eval_every > 0 and step % self.eval_every == 0)
    save = self.checkpoint_every > 0 and (
      last or step % self.checkpoint_every == 0
    )
    report = last or evaluate or save or step % self.progress_every == 0
    return Due(last=last, report=report, evaluate=evaluate, save=save)


def check_restart(
  config: ml_collections.ConfigDict,
  workdir: str,
  derived: AbstractSet[str] = frozenset(),
) -> None:
  """A ConfigError naming every changed key if `workdir` holds a run (a
  checkpoint or results.json) recorded with another config, beyond
  `results.RESUMABLE_KEYS` and the keys `derived` from them; or holds one
  with no config record to compare with. `config.resume_anyway` logs the
  keys instead."""
  checkpoints = paths.join(workdir, train_state.CHECKPOINT_SUBDIR)
  saved = results_lib.finished_results(workdir) is not None or any(
    name.isdigit() for name in paths.listdir(checkpoints)
  )
  record_path = paths.join(workdir, results_lib.CONFIG_FILE)
  recorded = results_lib.read_config_record(workdir)
  if recorded is None:
    if saved and not config.resume_anyway:
      raise ConfigError(
        f'{workdir} holds checkpoints or results but no config record '
        f'({record_path}), so this config cannot be checked against the '
        "run's: use a new --workdir, or --config.resume_anyway=True if you "
        'are sure it is the same config.'
      )
    return
  changes = results_lib.config_changes(recorded, config, derived)
  if not changes:
    return
  listed = '; '.join(f'{k}: {old!r} -> {new!r}' for k, old, new in changes)
  resumable = sorted(results_lib.RESUMABLE_KEYS - {'resume_anyway'})
  if not saved:  # Nothing to mix with: the earlier attempt saved nothing.
    logging.info('Starting over in %s with a new config: %s', workdir, listed)
  elif config.resume_anyway:
    logging.warning(
      'config.resume_anyway: continuing the run in %s with %s', workdir, listed
    )
  else:
    raise ConfigError(
      f'{workdir} holds a run with another config ({record_path}): {listed}. '
      'Resuming would mix the two runs and overwrite its results; use a new '
      '--workdir, or --config.resume_anyway=True to continue it with this '
      f'config. Changes that resume: {", ".join(resumable)}, and the values '
      'a config derives from them.'
    )


class StopSignals:
  """Turns SIGTERM and SIGINT (Ctrl-C) into a request to stop, while active.

  A run is inside from its setup to its outputs. A signal only records its
  name: raised as KeyboardInterrupt in the middle of a library's setup (a
  TensorFlow or tfds call) it can be swallowed there, or crash the
  process. The run asks `requested` at safe points: before its first step
  and after each step, so a signal never cuts a step, whose input buffers
  are donated, in half; it then saves that step and stops. A second signal
  stops the process at once, without saving (the operating system's
  default action: the checkpoints already on disk are intact, a save in
  progress is cleaned up at the next start). Outside the main thread, the
  only one Python delivers signals to, no handler is installed. The
  previous handlers are restored on exit.
  """

  _SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.reason: Optional[str] = None
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    del frame
    self.reason = signal.Signals(signum).name
    for s in self._SIGNALS:
      signal.signal(s, signal.SIG_DFL)
    logging.warning(
      'Got %s: stopping after the current step and saving it (before the '
      'first step if training has not started). Another signal stops at '
      'once, without saving.',
      self.reason,
    )

  def requested(self, poll_other_hosts: bool) -> bool:
    """Whether to stop now. With several processes, all must stop at the
    same step (their checkpoints are saved together), so they agree on it
    only when `poll_other_hosts` (a step where every process checks);
    otherwise they carry on."""
    if jax.process_count() == 1:
      return self.reason is not None
    if not poll_other_hosts:
      return False
    stop = multihost_utils.process_allgather(np.int32(self.reason is not None))
    if stop.any() and self.reason is None:
      self.reason = 'a signal on another host'
    return bool(stop.any())

  @contextlib.contextmanager
  def recording_interrupts(self) -> Iterator[None]:
    """Records a KeyboardInterrupt raised inside as a stop request, for
    code run where no handler could be installed (a thread other than the
    main one, whose Ctrl-C Python raises in the main thread)."""
    try:
      yield
    except KeyboardInterrupt:
      self.reason = self.reason or 'KeyboardInterrupt'

  def __enter__(self) -> 'StopSignals':
    if threading.current_thread() is threading.main_thread():
      self._previous = {
        s: signal.signal(s, self._handle) for s in self._SIGNALS
      }
    return self

  def __exit__(self, exc_type, exc, traceback) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)


def stopped_before_training(reason: str, start_step: int) -> Interrupted:
  """The `Interrupted` error of a run stopped while it was set up."""
  again = f'resume from step {start_step}' if start_step else 'start'
  return Interrupted(
    f'Training stopped by {reason} before its first step, while the run was '
    f'being set up; nothing was trained or saved. Run the same command '
    f'again to {again}.'
  )


def save_on_stop(
  checkpointer: train_state.TrainCheckpointer,
  engine: engine_lib.Engine,
  placed: steps.TrainState,
  step: int,
  reason: str,
  checkpoint_every: int,
) -> Interrupted:
  """Saves `placed`, `engine`'s state of `step` (the last one done), unless
  it is saved already or was lost to a step cut short; the `Interrupted`
  error saying where the latest state is."""
  checkpointer.wait_until_finished()
  directory = checkpointer.directory
  intact = not any(
    leaf.is_deleted()
    for leaf in jax.tree.leaves(placed)
    if isinstance(leaf, jax.Array)
  )
  if not checkpoint_every:
    saved = 'config.checkpoint_every=0, so no checkpoint was saved'
  elif checkpointer.latest_step() == step:
    saved = f'the checkpoint of step {step} is in {directory}'
  elif intact and step > 0:
    checkpointer.save(step, engine.saveable(placed))
    checkpointer.wait_until_finished()
    saved = f'saved a checkpoint of step {step} in {directory}'
  elif checkpointer.latest_step() is not None:
    saved = (
      f'the step was cut short; the latest checkpoint is step '
      f'{checkpointer.latest_step()} in {directory}'
    )
  else:
    saved = f'no checkpoint was saved yet (in {directory})'
  return Interrupted(
    f'Training stopped by {reason} after step {step}; {saved}. Run the same '
    'command again to resume.'
  )


def first_non_finite(
  history: List[Tuple[int, Dict[str, Any]]],
) -> Tuple[Optional[int], Dict[str, float]]:
  """The first step with a NaN/inf loss or params, else the mean metrics."""
  values = [
    (step, {k: float(v) for k, v in jax.device_get(m).items()})
    for step, m in history
  ]
  for step, scalars in values:
    if not (math.isfinite(scalars['loss']) and scalars['params_finite']):
      return step, scalars
  means = {
    k: float(np.mean([s[k] for _, s in values])) for k in ('loss', 'grad_norm')
  }
  means['learning_rate'] = values[-1][1]['learning_rate']
  return None, means


def divergence_error(
  step: int,
  scalars: Dict[str, float],
  last_checkpoint: Optional[int],
  directory: str,
  dtype: str,
) -> FloatingPointError:
  """What to say when the loss or the params stop being finite."""
  saved = (
    f'The last checkpoint with finite values is step '
    f'{last_checkpoint} in {directory}.'
    if last_checkpoint is not None
    else f'No checkpoint was saved yet (in {directory}).'
  )
  fixes = 'Lower config.base_lr or keep config.grad_norm_clip'
  if dtype != 'float32':
    fixes += ", or use config.dtype='float32'"
  return FloatingPointError(
    f'The training loss is {scalars["loss"]} at step {step} (params all '
    f'finite: {bool(scalars["params_finite"])}); stopped. {saved} '
    f'{fixes}.'
  )


class Monitor:
  """The training metrics between reports: checked, logged and written.

  The loop `record`s each step's metrics (device arrays, fetched only at a
  report, so steps are not synchronised with the host in between);
  `report` stops the run at the first step with a NaN/inf loss or params,
  else logs a progress line and writes the means as TensorBoard scalars.
  """

  def __init__(
    self,
    intervals: Intervals,
    start_step: int,
    images_per_step: int,
    writer: metrics_lib.MetricWriter,
    checkpointer: train_state.TrainCheckpointer,
    dtype: str,
  ):
    self._progress = metrics_lib.Progress(
      intervals.total_steps, start_step, images_per_step, jax.device_count()
    )
    self._writer = writer
    self._checkpointer = checkpointer
    self._dtype = dtype
    self._history: List[Tuple[int, Dict[str, Any]]] = []
    self._step_times: List[float] = []
    # Whether the first reported interval includes compiling the step.
    self._first_compiles = True

  def record(self, step: int, step_metrics: Dict[str, Any]) -> None:
    """Keeps the metrics of `step` for the next report."""
    self._history.append((step, step_metrics))

  def report(self, step: int) -> None:
    """Checks, logs and writes the metrics recorded since the last report;
    a FloatingPointError naming the first non-finite step."""
    self._checkpointer.check_for_errors()
    bad_step, scalars = first_non_finite(self._history)
    self._history = []
    if bad_step is not None:
      self._checkpointer.wait_until_finished()
      raise divergence_error(
        bad_step,
        scalars,
        self._checkpointer.latest_step(),
        self._checkpointer.directory,
        self._dtype,
      )
    scalars.update(
      self._progress.report(
        step, {'loss': scalars['loss'], 'lr': scalars['learning_rate']}
      )
    )
    self._step_times.append(scalars.pop('seconds_per_step'))
    self._writer.write(
      step,
      {
        f'train/{k}' if k in ('loss', 'grad_norm') else k: v
        for k, v in scalars.items()
      },
    )

  def restart_clock(self) -> None:
    """Leaves the time since the last report (evaluation, a checkpoint)
    out of the next progress line."""
    self._progress.restart_clock()

  def compiled(self, step: int) -> None:
    """Waits for the run's first step, `step` (not a report step), and
    starts the clock after it, so that no interval includes compiling."""
    jax.block_until_ready(self._history)
    self._progress.restart_clock(step)
    self._first_compiles = False

  def median_step_time(self) -> Optional[float]:
    """Seconds per step, the median over the reported intervals; without
    the first if it includes compiling and there are others."""
    times = self._step_times
    if self._first_compiles and len(times) > 1:
      times = times[1:]
    return float(np.median(times)) if times else None
