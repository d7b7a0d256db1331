"""The training job: data, model, optimizer, loop, evaluation, checkpoints.

`train_and_evaluate(config, workdir)` trains `config.model` on
`config.dataset` for `config.total_steps` data-parallel steps over all local
devices (and hosts), evaluates on the whole test split every
`config.eval_every` steps and at the end, checkpoints every
`config.checkpoint_every` steps and at the end, and resumes from the latest
checkpoint in `workdir`. It returns (and process 0 writes) `results.json`,
and writes what was trained (`config.finetune`) to a task file.
"""

import json
import math
import os
import time
from typing import Any, Dict, List, Optional, Tuple

from absl import logging
import jax
import ml_collections
import numpy as np

from vit_jax import input_pipeline
from vit_jax.checkpoint import files
from vit_jax.checkpoint import task_file
from vit_jax.checkpoint import train_state
from vit_jax.finetune import labels as labels_lib
from vit_jax.train import metrics as metrics_lib
from vit_jax.train import setup as setup_lib
from vit_jax.train import step as step_lib

RESULTS_FILE = 'results.json'


def check_batch_sizes(config: ml_collections.ConfigDict,
                      hosts: input_pipeline.Hosts) -> None:
  """Config errors for batches that do not split evenly, before compiling."""
  per_device = hosts.per_device_batch(config.batch)
  hosts.per_device_batch(config.batch_eval, 'batch_eval')
  if config.accum_steps < 1 or per_device % config.accum_steps:
    raise ValueError(
        f'config.batch={config.batch} gives {per_device} images per device, '
        f'which config.accum_steps={config.accum_steps} does not divide; '
        'make the batch a multiple of devices x accum_steps '
        f'({hosts.process_count * hosts.local_devices * config.accum_steps}).')


def _first_non_finite(history: List[Tuple[int, Dict[str, Any]]]
                      ) -> Tuple[Optional[int], Dict[str, float]]:
  """The first step with a NaN/inf loss or params, else the mean metrics."""
  values = [(step, {k: float(v[0]) for k, v in jax.device_get(m).items()})
            for step, m in history]
  for step, scalars in values:
    if not (math.isfinite(scalars['loss']) and scalars['params_finite']):
      return step, scalars
  means = {k: float(np.mean([s[k] for _, s in values]))
           for k in ('loss', 'grad_norm')}
  means['learning_rate'] = values[-1][1]['learning_rate']
  return None, means


def evaluate(eval_step, params, data: input_pipeline.EvalData,
             prefetch: int) -> Dict[str, float]:
  """Accuracy and loss over every example of the test split."""
  totals = None
  for batch in input_pipeline.device_prefetch(data.dataset, prefetch):
    sums = jax.device_get(eval_step(params, batch))
    sums = {k: float(v[0]) for k, v in sums.items()}
    totals = sums if totals is None else {
        k: totals[k] + sums[k] for k in totals}
  return {'accuracy': totals['correct'] / totals['count'],
          'loss': totals['loss'] / totals['count'],
          'examples': int(totals['count'])}


def _write_task_file(path: str, config: ml_collections.ConfigDict,
                     setup: setup_lib.Setup, params: Any,
                     info: input_pipeline.DatasetInfo,
                     test: Dict[str, float]) -> None:
  """Saves the trained leaves, with what is needed to rebuild their model."""
  task_file.save_task_params(
      path, params, trainable=setup.finetune.is_trainable, metadata={
          'model': config.model.to_dict(),
          'finetune': config.finetune.to_dict(),
          'dtype': config.dtype,
          'crop': config.pp.crop,
          'dataset': config.dataset,
          'num_classes': info.num_classes,
          'class_names': list(info.class_names),
          'pretrained_path': setup_lib.pretrained_path(config),
          'test_accuracy': test['accuracy'],
      })
  logging.info('Wrote the trained parameters to %s (%d bytes).', path,
               os.path.getsize(path))


def finished_results(workdir: str) -> Optional[Dict[str, Any]]:
  """The `results.json` of a run that finished in `workdir`, else None."""
  path = os.path.join(workdir, RESULTS_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       command: Optional[str] = None) -> Dict[str, Any]:
  """Trains and evaluates as configured; resumes from `workdir`.

  `command` (the command line that started the run, if any) is recorded in
  `results.json`, for the model card of a published run.
  """
  start_time = time.perf_counter()
  hosts = input_pipeline.Hosts.from_jax()
  check_batch_sizes(config, hosts)
  source = input_pipeline.get_source(config)
  setup = setup_lib.create_setup(config, source.info.num_classes)
  model, schedule, optimizer, state = (setup.model, setup.schedule,
                                       setup.optimizer, setup.state)
  os.makedirs(workdir, exist_ok=True)
  writer = metrics_lib.MetricWriter(workdir)
  with train_state.TrainCheckpointer(workdir) as checkpointer:
    restored = checkpointer.restore(state)
    if restored is not None:
      state = restored
      logging.info('Resuming from step %d in %s', int(state.step),
                   checkpointer.directory)
    start_step = int(state.step)
    train_step = step_lib.data_parallel(step_lib.make_train_step(
        model, optimizer, schedule, labels=setup.labels,
        accum_steps=config.accum_steps,
        label_smoothing=config.label_smoothing, seed=config.seed),
                                        donate_state=True)
    eval_step = step_lib.data_parallel(step_lib.make_eval_step(model))
    batches = input_pipeline.device_prefetch(
        input_pipeline.train_dataset(source, config, hosts,
                                     start_step=start_step), config.prefetch)
    eval_data = input_pipeline.eval_dataset(source, config, hosts)
    progress = metrics_lib.Progress(config.total_steps, start_step,
                                    config.batch, jax.device_count())
    replicated = step_lib.replicate(state)
    history, test, step_times = [], None, []

    for step in range(start_step + 1, config.total_steps + 1):
      replicated, step_metrics = train_step(replicated, next(batches))
      history.append((step, step_metrics))
      is_last = step == config.total_steps
      do_eval = is_last or step % config.eval_every == 0
      do_save = config.checkpoint_every and (
          is_last or step % config.checkpoint_every == 0)
      if is_last or do_eval or do_save or step % config.progress_every == 0:
        bad_step, scalars = _first_non_finite(history)
        history = []
        if bad_step is not None:
          checkpointer.wait_until_finished()
          raise FloatingPointError(
              f'The training loss is {scalars["loss"]} at step {bad_step} '
              f'(params all finite: {bool(scalars["params_finite"])}); '
              'stopped. The last checkpoint with finite values is step '
              f'{checkpointer.latest_step()} in {checkpointer.directory}. '
              'Lower config.base_lr, keep config.grad_norm_clip, or use '
              "config.dtype='float32'.")
        scalars.update(progress.report(step, {
            'loss': scalars['loss'], 'lr': scalars['learning_rate']}))
        step_times.append(scalars.pop('seconds_per_step'))
        writer.write(step, {f'train/{k}' if k in ('loss', 'grad_norm') else k:
                            v for k, v in scalars.items()})
      if do_eval:
        test = evaluate(eval_step, replicated.params, eval_data,
                        config.prefetch)
        logging.info('step %d: test accuracy %.4f over %d examples', step,
                     test['accuracy'], test['examples'])
        writer.write(step, {'test/accuracy': test['accuracy'],
                            'test/loss': test['loss']})
      if do_save:
        checkpointer.save(step, step_lib.unreplicate(replicated))
      if do_eval or do_save:
        progress.restart_clock()

    if test is None:  # Resumed a run that had already finished.
      test = evaluate(eval_step, replicated.params, eval_data,
                      config.prefetch)
  writer.close()
  params = step_lib.unreplicate(replicated).params
  task_path = config.finetune.task_file and os.path.join(
      workdir, config.finetune.task_file)
  if task_path and jax.process_index() == 0:
    _write_task_file(task_path, config, setup, params, source.info, test)
  results = {
      'test_accuracy': test['accuracy'],
      'test_loss': test['loss'],
      'test_examples': test['examples'],
      'steps': config.total_steps,
      'resumed_from_step': start_step,
      'wall_time_s': time.perf_counter() - start_time,
      # Median over progress intervals; the first one includes compiling.
      'step_time_s': (float(np.median(step_times[1:] or step_times))
                      if step_times else None),
      'finetune': setup.finetune.describe(),
      'trainable_params': labels_lib.count(params, setup.labels),
      'total_params': labels_lib.count(params, setup.labels, None),
      'task_file': task_path or None,
      'task_file_bytes': (os.path.getsize(task_path)
                          if task_path and os.path.exists(task_path) else None),
      'devices': jax.device_count(),
      'device_kind': jax.devices()[0].device_kind,
      'command': command,
      'config': json.loads(config.to_json_best_effort()),
  }
  if jax.process_index() == 0:
    files.write_json(os.path.join(workdir, RESULTS_FILE), results)
  return results
