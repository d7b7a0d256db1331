"""The training job: `train_and_evaluate(config, workdir)`, read top to bottom.

It trains `config.model` on `config.dataset` for `config.total_steps`
data-parallel steps over all local devices (and hosts), evaluates on the
whole test split every `config.eval_every` steps and at the end,
checkpoints every `config.checkpoint_every` steps and at the end, and
resumes from the latest checkpoint in `workdir`. Process 0 writes
`results.json` and what was trained (`config.finetune.task_file`). With
`config.ema_decay`, evaluation, results and task file use the moving
average of the trained weights (`steps.evaluated_params`).

A batch goes: `input_pipeline.train_dataset` (read, decode, augment, batch
per device) → the engine (`config.engine`: `jax.pmap` or `jax.jit` over a
mesh) puts it on the devices → the train step that `experiment.build`
makes (the loss `losses.classifier_loss`, its gradient with respect to the
trainable leaves, the optimizer update), compiled by the engine. What surrounds
the loop (intervals, restart check, stop signals, the NaN guard) is
`vit_jax.lifecycle`'s; the evaluations are `vit_jax.evaluation`'s.
"""

import contextlib
import dataclasses
import json
import time
from typing import Any, Dict, Iterator, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import optax

from vit_jax import config_checks
from vit_jax import evaluation
from vit_jax import experiment
from vit_jax import features
from vit_jax import fewshot
from vit_jax import input_pipeline
from vit_jax import lifecycle
from vit_jax import losses
from vit_jax import metrics as metrics_lib
from vit_jax import paths
from vit_jax import results as results_lib
from vit_jax import steps
from vit_jax import trainable as trainable_lib
from vit_jax import views
from vit_jax import workdir_lock
from vit_jax.checkpoint import pretrained
from vit_jax.checkpoint import task_file
from vit_jax.checkpoint import train_state
from vit_jax.errors import ConfigError
from vit_jax.errors import OutputError


def check_batch_sizes(
  config: ml_collections.ConfigDict, hosts: input_pipeline.Hosts
) -> None:
  """Config errors for batches that do not split evenly, before compiling."""
  per_device = hosts.per_device_batch(config.batch)
  hosts.per_device_batch(config.batch_eval, 'batch_eval')
  if config.accum_steps < 1 or per_device % config.accum_steps:
    raise ConfigError(
      f'config.batch={config.batch} gives {per_device} images per device, '
      f'which config.accum_steps={config.accum_steps} does not divide; '
      'make the batch a multiple of devices x accum_steps '
      f'({hosts.process_count * hosts.local_devices * config.accum_steps}).'
    )


def training_data(
  config: ml_collections.ConfigDict,
  source: input_pipeline.Source,
  hosts: input_pipeline.Hosts,
  start_step: int,
  exp: experiment.Experiment,
  params: Any,
) -> Any:
  """This host's training batches from `start_step` on (a tf.data
  Dataset): augmented images, or with `config.finetune.cache_features` the
  frozen model's features of every training image, computed here, once,
  with `params` (placed by `exp.engine`)."""
  if not config.finetune.cache_features:
    return input_pipeline.train_dataset(
      source,
      config.pp,
      batch_size=config.batch,
      seed=config.seed,
      shuffle_buffer=config.shuffle_buffer,
      hosts=hosts,
      start_step=start_step,
    )
  start = time.perf_counter()
  split = input_pipeline.eval_dataset(
    source,
    config.pp,
    batch_size=config.batch_eval,
    hosts=hosts,
    split=config.pp.train,
  )
  cached, labels = features.of_split(
    features.extractor(exp.model), exp.engine.gather(params), split
  )
  logging.info(
    'Cached the features of %d training images (%d wide) in %.1f s.',
    *cached.shape,
    time.perf_counter() - start,
  )
  return input_pipeline.feature_dataset(
    cached,
    labels,
    batch_size=config.batch,
    seed=config.seed,
    hosts=hosts,
    start_step=start_step,
  )


def with_complete_pp(
  config: ml_collections.ConfigDict,
) -> ml_collections.ConfigDict:
  """A locked copy of `config` whose `pp` has every preprocessing key
  (`input_pipeline.complete_pp`: vit_jax's configs set only `crop`, and
  `train`/`test` for tfds), so that the run, its record and every reader of
  the config see one preprocessing."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.pp = input_pipeline.complete_pp(config.pp)
  config.lock()
  return config


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, command: Optional[str] = None
) -> Dict[str, Any]:
  """Trains and evaluates as configured; resumes from `workdir`.

  `command` (the command line that started the run, if any) is recorded in
  `results.json`, for the model card of a published run. The run holds
  `workdir`'s lock (`vit_jax.workdir_lock`) from before it reads the
  workdir until its results are written.
  """
  start_time = time.perf_counter()
  # A signal from here on is a stop request, honoured before the first
  # step or after the current one.
  with lifecycle.StopSignals() as stop:
    derived = results_lib.derived_keys(config)
    config = with_complete_pp(config)
    config_checks.check(config)  # Every value, before anything is built.
    intervals = lifecycle.Intervals.from_config(config)
    hosts = input_pipeline.Hosts.from_jax()
    check_batch_sizes(config, hosts)
    views.check_eval_shift(config.eval_shift, config.pp.crop)
    pretrained_path = results_lib.pretrained_path(config)
    pretrained.check_exists(pretrained_path)
    paths.makedirs(workdir)
    with workdir_lock.WorkdirLock(workdir) as lock:
      lifecycle.check_restart(config, workdir, derived)
      return _train_locked(
        Run(config, workdir, command, start_time, intervals, hosts, lock, stop),
        pretrained_path,
      )


@dataclasses.dataclass(frozen=True)
class Run:
  """What a run is, once its config is checked and its workdir locked."""

  config: ml_collections.ConfigDict
  workdir: str
  command: Optional[str]
  start_time: float
  intervals: lifecycle.Intervals
  hosts: input_pipeline.Hosts
  lock: workdir_lock.WorkdirLock
  stop: lifecycle.StopSignals


def _train_locked(run: Run, pretrained_path: Optional[str]) -> Dict[str, Any]:
  """`train_and_evaluate`, from the data on, with the workdir locked."""
  config, workdir, intervals, hosts = (
    run.config,
    run.workdir,
    run.intervals,
    run.hosts,
  )
  # Data: the source of `config.dataset`, and the test split. ------------
  source = input_pipeline.get_source(
    config.dataset,
    tfds_data_dir=config.tfds_data_dir,
    tfds_manual_dir=config.tfds_manual_dir,
    tfds_download=config.tfds_download,
  )
  eval_data = input_pipeline.eval_dataset(
    source, config.pp, batch_size=config.batch_eval, hosts=hosts
  )

  # Model, initial params, what trains, optimizer and steps. -------------
  exp = experiment.build(config, source.info.num_classes, pretrained_path)
  log_finetuning(exp, pretrained_path)
  fewshot_evaluator = (
    fewshot.Evaluator(exp.model, source, config)
    if config.fewshot.shots
    else None
  )

  engine = exp.engine
  with train_state.TrainCheckpointer(workdir) as checkpointer:
    # Resume: the latest checkpoint in the workdir, if any; the run is
    # accepted, and its config recorded, once that restored. -------------
    state = exp.state
    restored = checkpointer.restore(engine.restore_target(state))
    if restored is not None:
      state = restored
      logging.info(
        'Resuming from step %d in %s', int(state.step), checkpointer.directory
      )
    start_step = int(state.step)
    check_not_shortened(start_step, intervals.total_steps, checkpointer)
    if hosts.process_count > 1:  # Every process checked the old record.
      multihost_utils.sync_global_devices('vit_jax: config checked')
    if jax.process_index() == 0:
      results_lib.write_config_record(workdir, config)
    writer = metrics_lib.MetricWriter(workdir, start_step)
    monitor = lifecycle.Monitor(
      intervals, start_step, config.batch, writer, checkpointer, config.dtype
    )
    evaluate = evaluation.Evaluation(
      engine,
      engine.eval_step(exp.eval_step),
      eval_data,
      config.prefetch,
      config.eval_shift,
      fewshot_evaluator,
      writer,
    )
    placed = engine.place(state)
    batches = engine.batches(
      training_data(config, source, hosts, start_step, exp, placed.params),
      config.prefetch,
    )
    train_step = engine.train_step(exp.train_step)

    # Loop: a step, then what is due after it. A stop signal ends the run
    # after the step it arrives in, the last one and the final evaluation
    # included. ----------------------------------------------------------
    scores = None  # The latest evaluation's.
    done_step = start_step  # The step whose state `placed` holds.
    stop = run.stop
    if stop.requested(poll_other_hosts=True):  # A signal during setup.
      writer.close()
      raise lifecycle.stopped_before_training(stop.reason, start_step)
    with stop.recording_interrupts():
      for step in range(start_step + 1, intervals.total_steps + 1):
        if step == start_step + 1:
          logging.info('Compiling the train step (the first step waits)...')
        placed, step_metrics = train_step(placed, next(batches))
        done_step = step
        monitor.record(step, engine.first(step_metrics))
        due = intervals.due(step)
        if step == start_step + 1 and not due.report:
          monitor.compiled(step)
        if due.report:
          monitor.report(step)
        if due.evaluate:
          scores = evaluate(step, placed)
        if due.save:
          run.lock.check()
          checkpointer.save(step, engine.saveable(placed))
        if due.evaluate or due.save:
          monitor.restart_clock()
        if stop.requested(poll_other_hosts=due.report):
          break
      if scores is None and stop.reason is None:
        scores = evaluate.scores(placed)  # Resumed a finished run.

    if stop.reason is not None:  # SIGTERM, Ctrl-C.
      writer.close()
      raise lifecycle.save_on_stop(
        checkpointer,
        engine,
        placed,
        done_step,
        stop.reason,
        intervals.checkpoint_every,
      )
  writer.close()

  # Outputs: the task file (what was trained) and results.json. ----------
  run.lock.check()
  saved_step = done_step if intervals.checkpoint_every else None
  test, shots = scores
  params = engine.gather(steps.evaluated_params(placed))
  with checkpoint_kept(saved_step, workdir):
    task_name = write_task_file(
      config, workdir, params, exp, source.info, pretrained_path, test
    )
  # Process 0 wrote the task file; the others record no figures of it.
  task_path = (
    paths.join(workdir, task_name)
    if task_name and jax.process_index() == 0
    else None
  )
  results = {
    'test_accuracy': test['accuracy'],
    'test_loss': test['loss'],
    'test_examples': test['examples'],
    'eval_views': len(views.offsets(config.eval_shift)),
    'test_one_view_accuracy': test['one_view_accuracy'],
    'test_one_view_loss': test['one_view_loss'],
    'steps': done_step,
    'resumed_from_step': start_step,
    'wall_time_s': time.perf_counter() - run.start_time,
    'step_time_s': monitor.median_step_time(),
    'fewshot_accuracy': shots,
    'finetune': exp.finetune.describe(),
    'trainable_params': trainable_lib.count(params, exp.trainable),
    'total_params': trainable_lib.count(params),
    'task_file': task_name,
    'task_file_bytes': paths.size(task_path) if task_path else None,
    'task_file_sha256': paths.sha256(task_path) if task_path else None,
    'devices': jax.device_count(),
    'device_kind': jax.devices()[0].device_kind,
    'command': run.command,
    'config': json.loads(config.to_json_best_effort()),
  }
  if jax.process_index() == 0:
    with checkpoint_kept(saved_step, workdir):
      write_results(workdir, results, test, config.eval_shift)
  return results


@contextlib.contextmanager
def checkpoint_kept(step: Optional[int], workdir: str) -> Iterator[None]:
  """Adds to an OutputError (an output that could not be written) that the
  run's checkpoint of `step` is intact (None: none was kept), and how to
  write the outputs from it."""
  try:
    yield
  except OutputError as e:
    kept = (
      f'The checkpoint of step {step} in {workdir} is intact; the same '
      'command writes the outputs from it.'
      if step is not None
      else 'config.checkpoint_every=0 kept no checkpoint to write them from.'
    )
    raise OutputError(f'{e} {kept}') from e


def check_not_shortened(
  step: int, total_steps: int, checkpointer: train_state.TrainCheckpointer
) -> None:
  """A ConfigError if the workdir's checkpoint is past `total_steps`: its
  weights would be evaluated and published as a shorter run's."""
  if step > total_steps:
    raise ConfigError(
      f'config.total_steps={total_steps}, but the run in '
      f'{checkpointer.directory} is at step {step}. A run cannot be '
      f'shortened after it trained: give --config.total_steps={step} or '
      'more to continue it, or use a new --workdir.'
    )


def log_finetuning(
  exp: experiment.Experiment, pretrained_path: Optional[str]
) -> None:
  """Logs how many parameters train, and warns when a frozen model is
  random (no pretrained checkpoint)."""
  fine = exp.finetune
  if fine.mode != 'full' and pretrained_path is None:
    logging.warning(
      'config.finetune.mode=%r without a pretrained checkpoint:'
      ' the frozen weights are random.',
      fine.mode,
    )
  params = exp.state.params
  logging.info(
    'Fine-tuning mode %s: %d of %d parameters train.',
    fine.describe(),
    trainable_lib.count(params, exp.trainable),
    trainable_lib.count(params),
  )


def write_task_file(
  config: ml_collections.ConfigDict,
  workdir: str,
  params: Any,
  exp: experiment.Experiment,
  info: input_pipeline.DatasetInfo,
  pretrained_path: Optional[str],
  test: Dict[str, float],
) -> Optional[str]:
  """Writes the trained leaves to `config.finetune.task_file` in `workdir`
  (process 0), with what it takes to use them; its name in `workdir`,
  None if the config names none."""
  if not config.finetune.task_file:
    return None
  task_path = paths.join(workdir, config.finetune.task_file)
  if jax.process_index() != 0:
    return config.finetune.task_file
  task_file.save_task_params(
    task_path,
    params,
    exp.trainable,
    metadata={
      'model': config.model.to_dict(),
      'finetune': config.finetune.to_dict(),
      'dtype': config.dtype,
      'crop': config.pp.crop,
      'dataset': config.dataset,
      'num_classes': info.num_classes,
      'class_names': list(info.class_names),
      'pretrained_path': pretrained_path,
      'test_accuracy': test['accuracy'],
    },
  )
  logging.info(
    'Wrote the trained parameters to %s (%d bytes).',
    task_path,
    paths.size(task_path),
  )
  return config.finetune.task_file


def write_results(
  workdir: str, results: Dict[str, Any], test: Dict[str, float], eval_shift: int
) -> None:
  """Writes `results.json` and prints the run's one-line summary."""
  results_path = paths.join(workdir, results_lib.RESULTS_FILE)
  paths.write_json(results_path, results)
  note = evaluation.views_note(test, eval_shift, digits=3)
  print(
    f'test accuracy {test["accuracy"]:.3f} on {test["examples"]:,} '
    f'images{note}, {metrics_lib.format_duration(results["wall_time_s"])}; '
    f'results in {results_path}',
    flush=True,
  )


def make_update_fn(
  *, apply_fn: Any, accum_steps: int, tx: optax.GradientTransformation
):
  """vit_jax's data-parallel update, under its name and signature.

  Returns `update_fn(params, opt_state, batch, rng) -> (params, opt_state,
  loss, new_rng)`, mapped over the local devices with `params` donated:
  the cross-entropy of `apply_fn`'s logits against `batch['label']`
  (one-hot as in vit_jax, or class indices), averaged over `accum_steps`
  micro-batches and the devices (`steps.mean_gradients`), then one step
  of `tx`. Dropout draws from `rng` folded with the device index. The
  training job itself uses `steps.make_train_step`, which also freezes
  leaves and reports metrics.
  """

  def loss_fn(params, images, labels, dropout_key):
    logits = apply_fn(
      {'params': params}, images, train=True, rngs={'dropout': dropout_key}
    )
    return losses.cross_entropy(logits, labels)

  def update_fn(params, opt_state, batch, rng):
    rng, new_rng = jax.random.split(rng)
    key = jax.random.fold_in(rng, jax.lax.axis_index(steps.AXIS))
    loss, grads = steps.mean_gradients(loss_fn, params, batch, key, accum_steps)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, new_rng

  return steps.data_parallel(update_fn, donate_state=True)
