"""Where training metrics go: TensorBoard, a JSON-lines file, the console.

Only process 0 writes (every process may call the methods). TensorBoard
event files are written with `tf.summary` (TensorFlow already runs the input
pipeline); `metrics.jsonl` has one JSON object per line, e.g.
`{"step": 100, "train/loss": 0.41, "learning_rate": 0.03, ...}`, for
scripts and notebooks. A resumed run first drops the lines of the steps it
runs again, so the file holds each step once.

In a bucket (a `gs://` workdir) nothing can be appended to: both files are
written locally and uploaded whole after every write, through `paths`.
"""

import json
import os
import tempfile
import time
from typing import List, Mapping, Optional

from absl import logging
import jax
import tensorflow as tf

from vit_jax import paths

METRICS_FILE = 'metrics.jsonl'


class MetricWriter:
  """Writes scalars to `workdir` as TensorBoard events and JSON lines."""

  def __init__(self, workdir: str, start_step: int = 0):
    """Opens the writers of a run that goes on from `start_step` (0: from
    scratch, else the restored step): the lines of `metrics.jsonl` after
    `start_step`, left by the interrupted run, are dropped first."""
    self._enabled = jax.process_index() == 0
    if not self._enabled:
      return
    self._workdir = workdir
    self._remote = paths.is_remote(workdir)
    paths.makedirs(workdir)
    # For a bucket, TensorBoard writes here and the files are uploaded.
    self._events_dir = tempfile.mkdtemp() if self._remote else workdir
    self._summary = tf.summary.create_file_writer(self._events_dir)
    self._path = paths.join(workdir, METRICS_FILE)
    self._lines = truncate_jsonl(self._path, start_step)
    if not self._remote:
      self._jsonl = open(self._path, 'a')

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self._enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    with self._summary.as_default():
      for name, value in scalars.items():
        tf.summary.scalar(name, value, step=step)
    self._summary.flush()
    line = json.dumps({'step': step, **scalars}) + '\n'
    if self._remote:
      self._lines.append(line)
      paths.write_text(self._path, ''.join(self._lines))
      self._upload_events()
    else:
      self._jsonl.write(line)
      self._jsonl.flush()

  def _upload_events(self) -> None:
    """Copies the local TensorBoard files of a bucket workdir into it."""
    for name in os.listdir(self._events_dir):
      paths.copy_file(
        os.path.join(self._events_dir, name), paths.join(self._workdir, name)
      )

  def close(self) -> None:
    if not self._enabled:
      return
    self._summary.close()
    if self._remote:
      self._upload_events()
      paths.remove_tree(self._events_dir)
    else:
      self._jsonl.close()


def truncate_jsonl(path: str, last_step: int) -> List[str]:
  """Drops the lines of the metrics file `path` with a step after
  `last_step`, and a last line cut short by a crash; rewrites the file
  atomically (a crash meanwhile leaves it whole), and only if a line goes.
  Returns the lines kept."""
  if not paths.exists(path):
    return []
  lines = paths.read_text(path).splitlines(keepends=True)
  kept = [line for line in lines if _step_of(line, last_step + 1) <= last_step]
  if len(kept) == len(lines):
    return kept
  logging.info(
    'Dropped %d lines after step %d from %s (the run resumes at that step).',
    len(lines) - len(kept),
    last_step,
    path,
  )
  paths.write_text(path, ''.join(kept))
  return kept


def _step_of(line: str, default: int) -> int:
  """The `step` of a metrics line; `default` for a line cut short."""
  try:
    return int(json.loads(line)['step'])
  except (ValueError, KeyError, TypeError):
    return default


def format_duration(seconds: float) -> str:
  """`3725` → `1h02m05s`; `65` → `1m05s`; `7` → `7s`."""
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  if hours:
    return f'{hours}h{minutes:02d}m{seconds:02d}s'
  if minutes:
    return f'{minutes}m{seconds:02d}s'
  return f'{seconds}s'


class Progress:
  """Throughput and ETA between calls of `report`, for the console."""

  def __init__(
    self,
    total_steps: int,
    start_step: int,
    images_per_step: int,
    num_cores: int,
  ):
    self._total = total_steps
    self._images_per_step = images_per_step
    self._cores = num_cores
    self._last_step, self._last_time = start_step, time.perf_counter()

  def report(
    self, step: int, extra: Optional[Mapping[str, float]] = None
  ) -> Mapping[str, float]:
    """Logs a progress line; returns img/s/core and seconds per step since
    the previous call."""
    now = time.perf_counter()
    seconds_per_step = (now - self._last_time) / max(step - self._last_step, 1)
    rate = self._images_per_step / seconds_per_step / self._cores
    self._last_step, self._last_time = step, now
    details = ' '.join(f'{k} {v:.4g}' for k, v in (extra or {}).items())
    logging.info(
      'step %d/%d (%.1f%%) %s | %.1f img/s/core | ETA %s',
      step,
      self._total,
      100 * step / self._total,
      details,
      rate,
      format_duration(seconds_per_step * (self._total - step)),
    )
    return {'img_per_sec_per_core': rate, 'seconds_per_step': seconds_per_step}

  def restart_clock(self, step: Optional[int] = None) -> None:
    """Excludes the time since the last report (evaluation, checkpoints),
    and the steps up to `step` if given (the first, which compiles)."""
    self._last_time = time.perf_counter()
    if step is not None:
      self._last_step = step
