"""A run's lifecycle: restarts with another config, SIGTERM/Ctrl-C, metrics."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading

import chex
import ml_collections
import pytest

from tests import helpers
from vit_jax import errors
from vit_jax import lifecycle
from vit_jax import metrics
from vit_jax import results as results_lib
from vit_jax import train as train_lib
from vit_jax.checkpoint import train_state
from vit_jax.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parent.parent
OUTPUTS = ('results.json', 'task_params.npz', 'config.json', 'metrics.jsonl')


def train(config, workdir):
  return train_lib.train_and_evaluate(config, str(workdir))


def final_state(config, workdir):
  """The latest step saved in `workdir` and its restored state."""
  target = helpers.create_setup(config, num_classes=10).state
  with train_state.TrainCheckpointer(workdir) as checkpointer:
    return checkpointer.latest_step(), checkpointer.restore(target)


def metric_lines(workdir):
  text = (pathlib.Path(workdir) / metrics.METRICS_FILE).read_text()
  return [json.loads(line) for line in text.splitlines()]


def steps_of(lines, key):
  return [line['step'] for line in lines if key in line]


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """An uninterrupted run of `helpers.job_config()`: its workdir."""
  workdir = tmp_path_factory.mktemp('straight')
  train(helpers.job_config(), workdir)
  return workdir


# --------------------------------------------------- the loop's intervals


@pytest.mark.parametrize(
  'key, value, message',
  [
    ('progress_every', 0, r'config.progress_every=0 must be >= 1'),
    ('eval_every', -1, r'config.eval_every=-1 must be >= 0'),
    ('checkpoint_every', -5, r'config.checkpoint_every=-5 must be >= 0'),
    ('total_steps', 0, r'config.total_steps=0 must be >= 1'),
  ],
)
def test_an_interval_out_of_range_is_refused_before_the_workdir(
  tmp_path, key, value, message
):
  workdir = tmp_path / 'run'
  with pytest.raises(ConfigError, match=message):
    train(helpers.job_config(**{key: value}), workdir)
  assert not workdir.exists()


def test_an_interval_that_is_not_an_integer_is_refused():
  """A config built in code (`ConfigDict`'s types do not stop it)."""
  config = ml_collections.ConfigDict(
    {
      'total_steps': 10,
      'progress_every': 2.5,
      'eval_every': 0,
      'checkpoint_every': 0,
    }
  )
  with pytest.raises(ConfigError, match='progress_every=2.5 must be an int'):
    lifecycle.Intervals.from_config(config)


def test_intervals_say_what_is_due_after_each_step():
  """Evaluation every 4 steps and at the end, checkpoints every 3 and at
  the end, reports every 5 steps and at each of those."""
  intervals = lifecycle.Intervals(
    total_steps=10, progress_every=5, eval_every=4, checkpoint_every=3
  )
  due = {step: intervals.due(step) for step in range(1, 11)}
  assert [s for s, d in due.items() if d.evaluate] == [4, 8, 10]
  assert [s for s, d in due.items() if d.save] == [3, 6, 9, 10]
  assert [s for s, d in due.items() if d.report] == [3, 4, 5, 6, 8, 9, 10]
  assert [s for s, d in due.items() if d.last] == [10]
  never = lifecycle.Intervals(10, 20, 0, 0)
  assert [s for s in range(1, 11) if never.due(s).evaluate] == [10]
  assert not any(never.due(s).save for s in range(1, 11))


# --------------------------------------------------- the config record


def test_config_equals_its_record_read_back():
  """Tuples (patch sizes) and None survive the JSON round trip."""
  config = helpers.job_config()
  record = json.loads(json.dumps(results_lib.config_record(config)))
  assert record['model.patches.size'] == [4, 4]
  assert record['pretrained_path'] is None
  assert results_lib.config_changes(record, config) == []


def test_config_changes_name_keys_outside_the_resumable_ones():
  record = results_lib.config_record(helpers.job_config())
  del record['finetune.injection.rank']  # As if recorded by an older run.
  changed = helpers.job_config(
    seed=3,
    total_steps=60,
    eval_every=7,
    eval_shift=1,
    accum_steps=2,
    resume_anyway=True,
  )
  changed.model.transformer.num_layers = 1
  assert results_lib.config_changes(record, changed) == [
    ('finetune.injection.rank', '(absent)', 8),
    ('model.transformer.num_layers', 2, 1),
    ('seed', 0, 3),
  ]


def test_a_record_without_a_key_added_later_holds_its_old_behaviour():
  """A run recorded before `ema_decay` existed resumes without one."""
  record = results_lib.config_record(helpers.job_config())
  del record['ema_decay']
  assert results_lib.config_changes(record, helpers.job_config()) == []
  assert results_lib.config_changes(
    record, helpers.job_config(ema_decay=0.99)
  ) == [('ema_decay', 0.0, 0.99)]


def test_restart_after_an_attempt_that_saved_nothing_starts_over(tmp_path):
  """A record without a checkpoint or results (e.g. a run that failed at
  its first step) does not block a corrected config."""
  results_lib.write_config_record(str(tmp_path), helpers.job_config(batch=64))
  lifecycle.check_restart(helpers.job_config(), str(tmp_path))
  (tmp_path / results_lib.RESULTS_FILE).write_text('{}')
  with pytest.raises(ConfigError, match=r'batch: 64 -> 32'):
    lifecycle.check_restart(helpers.job_config(), str(tmp_path))


@pytest.mark.slow
def test_restart_with_another_config_is_refused(straight, tmp_path):
  """Another dataset, seed or learning rate stops before anything in the
  workdir changes; total_steps resumes; resume_anyway overrides."""
  workdir = tmp_path / 'run'
  shutil.copytree(straight, workdir)  # A finished run of job_config().
  before = {name: (workdir / name).read_bytes() for name in OUTPUTS}

  with pytest.raises(ConfigError) as error:
    train(helpers.job_config(dataset='digits', seed=1, base_lr=0.01), workdir)
  message = str(error.value)
  for change in (
    'base_lr: 0.001 -> 0.01',
    "dataset: 'mnist5k' -> 'digits'",
    'seed: 0 -> 1',
  ):
    assert change in message
  assert 'new --workdir' in message and 'resume_anyway=True' in message
  after = {name: (workdir / name).read_bytes() for name in OUTPUTS}
  assert after == before  # results.json and the task file untouched.

  lifecycle.check_restart(
    helpers.job_config(seed=1, resume_anyway=True), str(workdir)
  )  # Does not raise.
  longer = train(helpers.job_config(total_steps=8), workdir)
  assert longer['resumed_from_step'] == 6 and longer['steps'] == 8
  assert results_lib.read_config_record(str(workdir))['total_steps'] == 8


# --------------------------------------------------- SIGTERM and Ctrl-C


@pytest.mark.slow
def test_sigterm_saves_the_step_and_resumes_as_uninterrupted(
  straight, tmp_path, monkeypatch
):
  config = helpers.job_config(checkpoint_every=100)  # Saves only at the end.
  workdir = str(tmp_path / 'preempted')
  original_write = metrics.MetricWriter.write

  def preempt_at_step_2(self, step, scalars):
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    original_write(self, step, scalars)

  # Python runs signal handlers in the main thread only (as pytest-xdist
  # runs tests); elsewhere the signal would end the test process.
  assert threading.current_thread() is threading.main_thread()
  handler = signal.getsignal(signal.SIGTERM)
  monkeypatch.setattr(metrics.MetricWriter, 'write', preempt_at_step_2)
  with pytest.raises(errors.Interrupted) as error:
    train(config, workdir)
  monkeypatch.undo()
  assert str(error.value) == (
    f'Training stopped by SIGTERM after step 2; saved a checkpoint of step 2 '
    f'in {workdir}/checkpoints. Run the same command again to resume.'
  )
  assert signal.getsignal(signal.SIGTERM) is handler  # Restored.
  with train_state.TrainCheckpointer(workdir) as checkpointer:
    assert checkpointer.all_steps() == [2]
  assert not os.path.exists(os.path.join(workdir, 'results.json'))

  assert train(config, workdir)['resumed_from_step'] == 2
  # The state of `straight` (checkpoint_every does not change what trains).
  (step_a, expected), (step_b, resumed) = (
    final_state(config, str(straight)),
    final_state(config, workdir),
  )
  assert step_a == step_b == 6
  chex.assert_trees_all_equal(expected, resumed)
  lines = metric_lines(workdir)
  assert steps_of(lines, 'train/loss') == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_metrics_after_a_resume_hold_each_step_once(straight, tmp_path):
  """A run that crashed after logging step 6 but before saving it resumes
  at checkpoint 3; the lines of steps 4 to 6 are dropped and written again,
  with the values of the uninterrupted run."""
  workdir = tmp_path / 'crashed'
  shutil.copytree(straight, workdir)
  shutil.rmtree(workdir / train_state.CHECKPOINT_SUBDIR / '6')
  assert train(helpers.job_config(), workdir)['resumed_from_step'] == 3
  lines, expected = metric_lines(workdir), metric_lines(straight)
  assert steps_of(lines, 'train/loss') == [1, 2, 3, 4, 5, 6]
  assert steps_of(lines, 'test/accuracy') == [3, 6]
  for key in ('train/loss', 'test/accuracy'):
    assert [x[key] for x in lines if key in x] == [
      x[key] for x in expected if key in x
    ]


def test_truncate_jsonl_drops_later_steps_and_a_cut_line(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  kept = '{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n'
  path.write_text(kept + '{"step": 3, "a": 3}\n{"step": 4, "a"')
  metrics.truncate_jsonl(str(path), 2)
  assert path.read_text() == kept
  metrics.truncate_jsonl(str(path), 0)
  assert path.read_text() == ''
  assert os.listdir(tmp_path) == ['metrics.jsonl']  # No temporary left.


@pytest.mark.slow
def test_main_stopped_by_sigterm_says_where_in_one_line(tmp_path):
  """`python -m vit_jax.main` receiving SIGTERM while it trains (the signal
  of a TPU VM's preemption) saves the step and exits 1 with one line."""
  workdir = tmp_path / 'run'
  process = subprocess.Popen(
    [
      sys.executable,
      '-m',
      'vit_jax.main',
      f'--config={REPO}/configs/scratch.py:mnist5k,micro4',
      '--config.model.transformer.num_layers=2',
      f'--workdir={workdir}',
      '--config.total_steps=100000',  # Runs until the signal.
      '--config.pp.crop=8',
      '--config.batch=32',
      '--config.eval_every=100000',
      '--config.checkpoint_every=100000',
    ],
    cwd=REPO,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  # Once the train step compiles, the loop's handler is set.
  stderr = helpers.signal_on_line(
    process, 'Compiling the train step', signal.SIGTERM
  )
  assert process.returncode == 1, stderr[-3000:]
  assert 'Traceback' not in stderr
  errors = [line for line in stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1, stderr[-3000:]
  saved = os.listdir(workdir / 'checkpoints')
  assert len(saved) == 1 and saved[0].isdigit()
  assert errors[0] == (
    f'error: Training stopped by SIGTERM after step {saved[0]}; saved a '
    f'checkpoint of step {saved[0]} in {workdir}/checkpoints. Run the same '
    'command again to resume.'
  )
