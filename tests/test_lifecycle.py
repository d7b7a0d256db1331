"""A run's lifecycle: restarts with another config, SIGTERM/Ctrl-C, metrics."""

import hashlib
import json
import os
import pathlib
import resource
import shutil
import signal
import subprocess
import sys
import threading

import chex
import ml_collections
import pytest

from configs import scratch
from tests import helpers
from vit_jax import errors
from vit_jax import evaluation
from vit_jax import lifecycle
from vit_jax import metrics
from vit_jax import publish
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


def test_values_derived_from_total_steps_follow_it_on_a_restart(tmp_path):
  """`configs/scratch.py` derives warmup_steps from total_steps: extending
  the run changes both and resumes; warmup_steps set by hand does not."""
  workdir = str(tmp_path)
  recorded = scratch.get_config('digits')
  recorded.total_steps = 40
  (tmp_path / results_lib.RESULTS_FILE).write_text('{}')
  results_lib.write_config_record(
    workdir, recorded.copy_and_resolve_references()
  )
  extended = scratch.get_config('digits')
  extended.total_steps = 60
  derived = results_lib.derived_keys(extended)
  assert derived == {'warmup_steps'}
  lifecycle.check_restart(
    extended.copy_and_resolve_references(), workdir, derived
  )
  extended.warmup_steps = 7  # Now the user's own value.
  assert results_lib.derived_keys(extended) == set()
  with pytest.raises(ConfigError, match=r'warmup_steps: 2 -> 7'):
    lifecycle.check_restart(extended, workdir, set())


def test_checkpoints_without_a_config_record_are_refused(straight, tmp_path):
  """With config.json gone, nothing tells a changed learning rate from the
  run's own: the restart is refused unless resume_anyway."""
  workdir = tmp_path / 'run'
  shutil.copytree(straight, workdir)
  (workdir / results_lib.CONFIG_FILE).unlink()
  with pytest.raises(ConfigError, match='no config record'):
    train(helpers.job_config(base_lr=0.5), workdir)
  assert not (workdir / results_lib.CONFIG_FILE).exists()
  lifecycle.check_restart(
    helpers.job_config(resume_anyway=True), str(workdir)
  )  # Does not raise.


@pytest.mark.slow
def test_a_refused_restart_leaves_the_config_record_alone(straight, tmp_path):
  """resume_anyway with another model passes the config check, but the
  checkpoint does not fit: the record keeps the run's config, so the
  workdir still accepts its own command."""
  workdir = tmp_path / 'run'
  shutil.copytree(straight, workdir)
  record = (workdir / results_lib.CONFIG_FILE).read_bytes()
  config = helpers.job_config(resume_anyway=True)
  config.model.hidden_size = 2 * config.model.hidden_size
  with pytest.raises(errors.CheckpointError, match='does not fit'):
    train(config, workdir)
  assert (workdir / results_lib.CONFIG_FILE).read_bytes() == record
  lifecycle.check_restart(helpers.job_config(), str(workdir))


def test_a_finished_run_is_not_shortened(straight, tmp_path):
  """Its step-6 weights would be recorded as a 4-step run's."""
  workdir = tmp_path / 'run'
  shutil.copytree(straight, workdir)
  before = {name: (workdir / name).read_bytes() for name in OUTPUTS}
  with pytest.raises(ConfigError, match=r'total_steps=4, but .* at step 6'):
    train(helpers.job_config(total_steps=4), workdir)
  assert {name: (workdir / name).read_bytes() for name in OUTPUTS} == before


def test_results_name_the_task_file_in_the_workdir_by_its_contents(straight):
  results = json.loads((straight / results_lib.RESULTS_FILE).read_text())
  assert results['task_file'] == 'task_params.npz'
  assert results['steps'] == 6
  digest = hashlib.sha256((straight / 'task_params.npz').read_bytes())
  assert results['task_file_sha256'] == digest.hexdigest()


def test_publish_reads_the_copy_and_refuses_disagreeing_files(
  straight, tmp_path
):
  """A copied workdir publishes its own task file; one whose task file is
  not the one results.json describes is refused."""
  copied = tmp_path / 'copied'
  shutil.copytree(straight, copied)
  with open(copied / 'task_params.npz', 'ab') as f:
    f.write(b'\0')  # Not the weights results.json describes.
  with pytest.raises(ConfigError, match='is not the task file'):
    publish.publish(str(copied), str(tmp_path / 'card'))
  assert not (tmp_path / 'card').exists()
  shutil.copy(straight / 'task_params.npz', copied / 'task_params.npz')
  publish.publish(str(copied), str(tmp_path / 'card'))
  assert (tmp_path / 'card').is_dir()


@pytest.mark.slow
def test_a_full_disk_at_the_outputs_is_one_error_and_resumes(
  straight, tmp_path
):
  """The task file cannot be written (the process's file-size limit
  stands in for a full disk: the same failed write): one error naming the
  file and the intact checkpoint; the next start writes the outputs."""
  workdir = tmp_path / 'run'
  shutil.copytree(straight, workdir)
  for name in ('results.json', 'task_params.npz'):
    (workdir / name).unlink()
  limit = (straight / 'metrics.jsonl').stat().st_size + 4096
  assert limit < (straight / 'task_params.npz').stat().st_size
  previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
  try:
    with pytest.raises(errors.OutputError) as error:
      train(helpers.job_config(), workdir)
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous)
  assert str(error.value) == (
    f'Cannot write {workdir}/task_params.npz: File too large. Its previous '
    'version, if any, is unchanged; free space (or fix the permissions) and '
    f'run again. The checkpoint of step 6 in {workdir} is intact; the same '
    'command writes the outputs from it.'
  )
  assert not [n for n in os.listdir(workdir) if n.startswith('.tmp')]
  assert train(helpers.job_config(), workdir)['steps'] == 6


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
    env=helpers.cpu_env(),
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


@pytest.mark.slow
def test_sigterm_during_the_final_evaluation_stops_without_results(
  straight, tmp_path, monkeypatch
):
  """A finished run whose results were not written yet evaluates on
  restart; SIGTERM then stops it like any step: no results.json, exit
  with the message, and the next start writes them."""
  workdir = tmp_path / 'run'
  shutil.copytree(straight, workdir)
  (workdir / results_lib.RESULTS_FILE).unlink()
  original = evaluation.Evaluation.scores

  def preempted(self, placed):
    os.kill(os.getpid(), signal.SIGTERM)
    return original(self, placed)

  monkeypatch.setattr(evaluation.Evaluation, 'scores', preempted)
  with pytest.raises(errors.Interrupted, match='SIGTERM after step 6; the'):
    train(helpers.job_config(), workdir)
  assert not (workdir / results_lib.RESULTS_FILE).exists()
  monkeypatch.undo()
  assert train(helpers.job_config(), workdir)['steps'] == 6


def test_a_second_signal_stops_at_once():
  """The first signal asks the loop to stop after its step; the second
  ends the process there, by the system's default action (no
  traceback)."""
  script = (
    'import os, signal, time\n'
    'from vit_jax import lifecycle\n'
    'with lifecycle.StopSignals() as stop:\n'
    '  os.kill(os.getpid(), signal.SIGINT)\n'
    '  print(stop.reason, flush=True)\n'
    '  os.kill(os.getpid(), signal.SIGTERM)\n'
    '  time.sleep(60)\n'
    'print("not stopped", flush=True)\n'
  )
  process = subprocess.run(
    [sys.executable, '-c', script],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert process.returncode == -signal.SIGTERM
  assert process.stdout == 'SIGINT\n'
  assert 'Traceback' not in process.stderr


def test_step_time_leaves_out_the_compiling_first_step(tmp_path, monkeypatch):
  """A resumed run with one report interval: its median step time is the
  time of the steps after the first (which compiles), not the interval
  that includes it."""
  clock = [100.0]
  monkeypatch.setattr(metrics.time, 'perf_counter', lambda: clock[0])
  intervals = lifecycle.Intervals(
    total_steps=10, progress_every=100, eval_every=0, checkpoint_every=0
  )
  writer = metrics.MetricWriter(str(tmp_path), start_step=6)
  with train_state.TrainCheckpointer(tmp_path) as checkpointer:
    monitor = lifecycle.Monitor(
      intervals, 6, 32, writer, checkpointer, 'float32'
    )
    step_metrics = {
      'loss': 1.0,
      'params_finite': True,
      'grad_norm': 1.0,
      'learning_rate': 0.1,
    }
    clock[0] += 30.0  # Step 7 compiles and runs.
    monitor.record(7, step_metrics)
    monitor.compiled(7)
    for step in (8, 9, 10):
      clock[0] += 0.5
      monitor.record(step, step_metrics)
    monitor.report(10)
  writer.close()
  assert monitor.median_step_time() == pytest.approx(0.5)


def test_ctrl_c_while_the_run_sets_up_stops_before_the_first_step(tmp_path):
  """Ctrl-C while the run sets up (here: when it has read the config and
  chosen its starting point) is a stop request like one during training:
  raised as KeyboardInterrupt inside TensorFlow's setup it was swallowed
  (the run trained on) or crashed the process. The run stops before its
  first step with one line, without a traceback, and wrote no checkpoint."""
  workdir = tmp_path / 'run'
  process = subprocess.Popen(
    helpers.tiny_digits_main(workdir, total_steps=4),
    cwd=REPO,
    env=helpers.cpu_env(),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  stderr = helpers.signal_on_line(
    process, 'No pretrained checkpoint configured', signal.SIGINT
  )
  assert process.returncode == 1, stderr[-3000:]
  assert 'Traceback' not in stderr
  (line,) = [x for x in stderr.splitlines() if x.startswith('error:')]
  assert line == (
    'error: Training stopped by SIGINT before its first step, while the run '
    'was being set up; nothing was trained or saved. Run the same command '
    'again to start.'
  )
  assert not list((workdir / 'checkpoints').glob('[0-9]*'))
