"""The training job: `train_and_evaluate(config, workdir)`, read top to bottom.

It trains `config.model` on `config.dataset` for `config.total_steps`
data-parallel steps over all local devices (and hosts), evaluates on the
whole test split every `config.eval_every` steps and at the end,
checkpoints every `config.checkpoint_every` steps and at the end, and
resumes from the latest checkpoint in `workdir`. Process 0 writes
`results.json` and what was trained (`config.finetune.task_file`). With
`config.ema_decay`, evaluation, results and task file use the moving
average of the trained weights (`steps.evaluated_params`).

Lifecycle: the config is recorded in `workdir/config.json`, and a restart
whose config changes more than `results.RESUMABLE_KEYS` stops before it
touches the workdir (`check_restart`). SIGTERM (a preempted TPU VM) or
Ctrl-C stops the loop at the end of the current step, saves that step and
raises `Interrupted`, whose message says where (`StopSignals`).

The experiment config is unpacked here and only here; the functions called
take explicit arguments. A batch goes: `input_pipeline.train_dataset`
(read, decode, augment, batch per device) → `device_prefetch` → `train_step`
(`steps.make_train_step`: the loss `losses.classifier_loss`, its gradient
with respect to the trainable leaves, the optimizer update).
"""

import json
import math
import signal
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import optax

from vit_jax import features
from vit_jax import fewshot
from vit_jax import finetune
from vit_jax import input_pipeline
from vit_jax import losses
from vit_jax import metrics as metrics_lib
from vit_jax import optim
from vit_jax import paths
from vit_jax import results as results_lib
from vit_jax import steps
from vit_jax import trainable as trainable_lib
from vit_jax import views
from vit_jax.checkpoint import pretrained
from vit_jax.checkpoint import task_file
from vit_jax.checkpoint import train_state
from vit_jax.errors import ConfigError
from vit_jax.errors import Interrupted
from vit_jax.models import heads


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


def check_restart(config: ml_collections.ConfigDict, workdir: str) -> None:
  """A ConfigError naming every changed key if `workdir` holds a run (a
  checkpoint or results.json) recorded with another config, beyond
  `results.RESUMABLE_KEYS`; `config.resume_anyway` logs the keys instead."""
  recorded = results_lib.read_config_record(workdir)
  changes = recorded and results_lib.config_changes(recorded, config)
  if not changes:
    return
  checkpoints = paths.join(workdir, train_state.CHECKPOINT_SUBDIR)
  saved = results_lib.finished_results(workdir) is not None or bool(
    paths.listdir(checkpoints)
  )
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
      f'{workdir} holds a run with another config '
      f'({paths.join(workdir, results_lib.CONFIG_FILE)}): {listed}. '
      'Resuming would mix the two runs and overwrite its results; use a new '
      '--workdir, or --config.resume_anyway=True to continue it with this '
      f'config. Changes that resume: {", ".join(resumable)}.'
    )


class StopSignals:
  """Turns SIGTERM and SIGINT (Ctrl-C) into a request to stop, while active.

  The training loop polls `requested` after each step but the last (which
  then finishes the run), so a signal never cuts a step, whose input
  buffers are donated, in half. A second signal raises KeyboardInterrupt at
  once. The context suppresses KeyboardInterrupt (raised by that second
  signal, or by code) and records it as the reason too. Outside the main
  thread, the only one Python delivers signals to, no handler is installed.
  The previous handlers are restored on exit.
  """

  _SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.reason: Optional[str] = None
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    del frame
    if self.reason is not None:
      raise KeyboardInterrupt
    self.reason = signal.Signals(signum).name

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

  def __enter__(self) -> 'StopSignals':
    if threading.current_thread() is threading.main_thread():
      self._previous = {
        s: signal.signal(s, self._handle) for s in self._SIGNALS
      }
    return self

  def __exit__(self, exc_type, exc, traceback) -> bool:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    if exc_type is KeyboardInterrupt:
      self.reason = self.reason or 'KeyboardInterrupt'
      return True
    return False


def save_on_stop(
  checkpointer: train_state.TrainCheckpointer,
  replicated: steps.TrainState,
  step: int,
  reason: str,
  checkpoint_every: int,
) -> Interrupted:
  """Saves the state of `step` (the last one done) unless it is saved
  already; the `Interrupted` error saying where it is."""
  checkpointer.wait_until_finished()
  directory = checkpointer.directory
  intact = not any(
    leaf.is_deleted()
    for leaf in jax.tree.leaves(replicated)
    if isinstance(leaf, jax.Array)
  )
  if not checkpoint_every:
    saved = 'config.checkpoint_every=0, so no checkpoint was saved'
  elif checkpointer.latest_step() == step:
    saved = f'the checkpoint of step {step} is in {directory}'
  elif intact and step > 0:
    checkpointer.save(step, steps.unreplicate(replicated))
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
    (step, {k: float(v[0]) for k, v in jax.device_get(m).items()})
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


def evaluate(
  eval_step, params, data: input_pipeline.EvalData, prefetch: int
) -> Dict[str, float]:
  """Accuracy and loss over every example of the test split, and those of
  the unshifted images alone (`one_view_*`: the same unless the step
  averages over views, `config.eval_shift`)."""
  totals = None
  for batch in input_pipeline.device_prefetch(data.dataset, prefetch):
    sums = jax.device_get(eval_step(params, batch))
    sums = {k: float(v[0]) for k, v in sums.items()}
    totals = (
      sums if totals is None else {k: totals[k] + sums[k] for k in totals}
    )
  count = totals['count']
  return {
    'accuracy': totals['correct'] / count,
    'loss': totals['loss'] / count,
    'one_view_accuracy': totals.get('one_view_correct', totals['correct'])
    / count,
    'one_view_loss': totals.get('one_view_loss', totals['loss']) / count,
    'examples': int(count),
  }


def views_note(test: Dict[str, float], eval_shift: int, digits: int) -> str:
  """' (mean of 9 views ...; one view: A)' after an accuracy averaged over
  shifted views, with the one-view accuracy; '' for one view per image."""
  if not eval_shift:
    return ''
  one_view = test['one_view_accuracy']
  return f' ({views.describe(eval_shift)}; one view: {one_view:.{digits}f})'


def evaluation_scalars(
  test: Dict[str, float], eval_shift: int
) -> Dict[str, float]:
  """The metrics of an evaluation under their TensorBoard names."""
  scalars = {'test/accuracy': test['accuracy'], 'test/loss': test['loss']}
  if eval_shift:
    scalars['test/one_view_accuracy'] = test['one_view_accuracy']
    scalars['test/one_view_loss'] = test['one_view_loss']
  return scalars


def training_data(
  config: ml_collections.ConfigDict,
  source: input_pipeline.Source,
  hosts: input_pipeline.Hosts,
  start_step: int,
  model: Any,
  params: Any,
) -> Any:
  """This host's training batches from `start_step` on (a tf.data
  Dataset): augmented images, or with `config.finetune.cache_features` the
  frozen model's features of every training image, computed here, once."""
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
  cached, labels = features.of_split(features.extractor(model), params, split)
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


def evaluate_fewshot(
  evaluator: fewshot.Evaluator,
  replicated: steps.TrainState,
  step: int,
  writer: metrics_lib.MetricWriter,
) -> Dict[str, float]:
  """The few-shot accuracies of the current parameters, logged and written
  as `fewshot/{k}shot`."""
  shots = evaluator(steps.unreplicate(steps.evaluated_params(replicated)))
  logging.info(
    'step %d: few-shot linear accuracy %s',
    step,
    fewshot.summary(shots, evaluator.shots),
  )
  writer.write(step, {f'fewshot/{k}': v for k, v in shots.items()})
  return shots


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, command: Optional[str] = None
) -> Dict[str, Any]:
  """Trains and evaluates as configured; resumes from `workdir`.

  `command` (the command line that started the run, if any) is recorded in
  `results.json`, for the model card of a published run.
  """
  start_time = time.perf_counter()
  is_writer = jax.process_index() == 0

  # Setup: hosts, batch sizes, the checkpoint to start from, the workdir.
  hosts = input_pipeline.Hosts.from_jax()
  check_batch_sizes(config, hosts)
  views.check_eval_shift(config.eval_shift, config.pp.crop)
  pretrained_path = results_lib.pretrained_path(config)
  pretrained.check_exists(pretrained_path)
  paths.makedirs(workdir)
  check_restart(config, workdir)
  if hosts.process_count > 1:  # Every process checked the old record.
    multihost_utils.sync_global_devices('vit_jax: config checked')
  if is_writer:
    results_lib.write_config_record(workdir, config)

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

  # Model and initial params: fresh, then the pretrained checkpoint. -----
  fine = finetune.from_config(config.finetune)
  model = finetune.build_model(config, source.info.num_classes, fine)
  params = pretrained.init_params(
    model,
    config.pp.crop,
    seed=config.seed,
    pretrained_path=pretrained_path,
    model_config=config.model,
    is_added=fine.is_added,
  )
  fine.check(params)
  if fine.mode != 'full' and pretrained_path is None:
    logging.warning(
      'config.finetune.mode=%r without a pretrained checkpoint:'
      ' the frozen weights are random.',
      fine.mode,
    )
  trainable = fine.is_trainable  # The run's one decision of what trains.
  if config.finetune.cache_features:
    features.check_cacheable(config, model, params, trainable)
  logging.info(
    'Fine-tuning mode %s: %d of %d parameters train.',
    fine.describe(),
    trainable_lib.count(params, trainable),
    trainable_lib.count(params),
  )

  # Few-shot evaluation of the representation, if asked for. ------------
  fewshot_eval = (
    fewshot.Evaluator(model, source, config) if config.fewshot.shots else None
  )
  shots = None  # Its latest figures.

  # Optimizer: schedule and update rule, for the trainable leaves. -------
  schedule, optimizer = optim.from_config(config)
  state = steps.initial_state(params, optimizer, trainable, config.ema_decay)

  with train_state.TrainCheckpointer(workdir) as checkpointer:
    # Resume: the latest checkpoint in the workdir, if any. --------------
    restored = checkpointer.restore(state)
    if restored is not None:
      state = restored
      logging.info(
        'Resuming from step %d in %s', int(state.step), checkpointer.directory
      )
    start_step = int(state.step)
    writer = metrics_lib.MetricWriter(workdir, start_step)

    # Step functions, mapped over the local devices. ----------------------
    train_step = steps.data_parallel(
      steps.make_train_step(
        losses.classifier_loss(
          heads.Head.of(model) if config.finetune.cache_features else model,
          config.label_smoothing,
        ),
        optimizer,
        schedule,
        trainable,
        accum_steps=config.accum_steps,
        seed=config.seed,
        ema_decay=config.ema_decay,
      ),
      donate_state=True,
    )
    eval_step = steps.data_parallel(
      steps.make_eval_step(model, config.eval_shift)
    )

    # Training data from the resumed step on. -----------------------------
    batches = input_pipeline.device_prefetch(
      training_data(config, source, hosts, start_step, model, state.params),
      config.prefetch,
    )

    # Loop: step; every progress_every steps check and log the metrics;
    # evaluate and checkpoint on their intervals and at the end. ---------
    progress = metrics_lib.Progress(
      config.total_steps, start_step, config.batch, jax.device_count()
    )
    replicated = steps.replicate(state)
    history, test, step_times = [], None, []
    done_step = start_step  # The step whose state `replicated` holds.
    finished = False
    with StopSignals() as stop:
      for step in range(start_step + 1, config.total_steps + 1):
        if step == start_step + 1:
          logging.info(
            'Compiling the train step (the first step waits for it)...'
          )
        replicated, step_metrics = train_step(replicated, next(batches))
        done_step = step
        history.append((step, step_metrics))
        is_last = step == config.total_steps
        do_eval = is_last or (
          config.eval_every > 0 and step % config.eval_every == 0
        )
        do_save = config.checkpoint_every and (
          is_last or step % config.checkpoint_every == 0
        )
        reports = (
          is_last or do_eval or do_save or step % config.progress_every == 0
        )
        if reports:
          bad_step, scalars = first_non_finite(history)
          history = []
          if bad_step is not None:
            checkpointer.wait_until_finished()
            raise divergence_error(
              bad_step,
              scalars,
              checkpointer.latest_step(),
              checkpointer.directory,
              config.dtype,
            )
          scalars.update(
            progress.report(
              step, {'loss': scalars['loss'], 'lr': scalars['learning_rate']}
            )
          )
          step_times.append(scalars.pop('seconds_per_step'))
          writer.write(
            step,
            {
              f'train/{k}' if k in ('loss', 'grad_norm') else k: v
              for k, v in scalars.items()
            },
          )

        # Evaluation: every test example once, across hosts. --------------
        if do_eval:
          test = evaluate(
            eval_step,
            steps.evaluated_params(replicated),
            eval_data,
            config.prefetch,
          )
          logging.info(
            'step %d: test accuracy %.4f over %d examples%s',
            step,
            test['accuracy'],
            test['examples'],
            views_note(test, config.eval_shift, digits=4),
          )
          writer.write(step, evaluation_scalars(test, config.eval_shift))
          if fewshot_eval:
            shots = evaluate_fewshot(fewshot_eval, replicated, step, writer)
        if do_save:
          checkpointer.save(step, steps.unreplicate(replicated))
        if do_eval or do_save:
          progress.restart_clock()
        if not is_last and stop.requested(poll_other_hosts=reports):
          break
      else:
        finished = True  # Not stopped by a signal or KeyboardInterrupt.

    if not finished:  # SIGTERM, Ctrl-C: save, say where, stop.
      writer.close()
      raise save_on_stop(
        checkpointer,
        replicated,
        done_step,
        stop.reason,
        config.checkpoint_every,
      )
    if test is None:  # Resumed a run that had already finished.
      test = evaluate(
        eval_step,
        steps.evaluated_params(replicated),
        eval_data,
        config.prefetch,
      )
      if fewshot_eval:
        shots = fewshot_eval(
          steps.unreplicate(steps.evaluated_params(replicated))
        )
  writer.close()

  # Outputs: the task file (what was trained) and results.json. ----------
  params = steps.unreplicate(steps.evaluated_params(replicated))
  task_path = config.finetune.task_file and paths.join(
    workdir, config.finetune.task_file
  )
  if task_path and is_writer:
    task_file.save_task_params(
      task_path,
      params,
      trainable,
      metadata={
        'model': config.model.to_dict(),
        'finetune': config.finetune.to_dict(),
        'dtype': config.dtype,
        'crop': config.pp.crop,
        'dataset': config.dataset,
        'num_classes': source.info.num_classes,
        'class_names': list(source.info.class_names),
        'pretrained_path': pretrained_path,
        'test_accuracy': test['accuracy'],
      },
    )
    logging.info(
      'Wrote the trained parameters to %s (%d bytes).',
      task_path,
      paths.size(task_path),
    )
  results = {
    'test_accuracy': test['accuracy'],
    'test_loss': test['loss'],
    'test_examples': test['examples'],
    'eval_views': len(views.offsets(config.eval_shift)),
    'test_one_view_accuracy': test['one_view_accuracy'],
    'test_one_view_loss': test['one_view_loss'],
    'steps': config.total_steps,
    'resumed_from_step': start_step,
    'wall_time_s': time.perf_counter() - start_time,
    # Median over progress intervals; the first one includes compiling.
    'step_time_s': (
      float(np.median(step_times[1:] or step_times)) if step_times else None
    ),
    'fewshot_accuracy': shots,
    'finetune': fine.describe(),
    'trainable_params': trainable_lib.count(params, trainable),
    'total_params': trainable_lib.count(params),
    'task_file': task_path or None,
    'task_file_bytes': (
      paths.size(task_path) if task_path and paths.exists(task_path) else None
    ),
    'devices': jax.device_count(),
    'device_kind': jax.devices()[0].device_kind,
    'command': command,
    'config': json.loads(config.to_json_best_effort()),
  }
  if is_writer:
    results_path = paths.join(workdir, results_lib.RESULTS_FILE)
    paths.write_json(results_path, results)
    print(
      f'test accuracy {test["accuracy"]:.3f} on {test["examples"]:,} '
      f'images{views_note(test, config.eval_shift, digits=3)}, '
      f'{metrics_lib.format_duration(results["wall_time_s"])}; '
      f'results in {results_path}',
      flush=True,
    )
  return results


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
