"""Evaluation during a run: the whole test split, and few-shot.

`evaluate` scores every example of the test split once across hosts, with
the one-view figures beside those averaged over shifted views
(`config.eval_shift`). `Evaluation` is what the training loop calls at a
step: the test split and, if configured, the few-shot linear evaluation of
the representation, logged and written as TensorBoard scalars.
"""

from typing import Any, Callable, Dict, Optional, Tuple

from absl import logging
import jax

from vit_jax import engine as engine_lib
from vit_jax import fewshot
from vit_jax import input_pipeline
from vit_jax import metrics as metrics_lib
from vit_jax import steps
from vit_jax import views

Scores = Tuple[Dict[str, float], Optional[Dict[str, float]]]


def evaluate(
  engine: engine_lib.Engine,
  eval_step: Callable[..., Any],
  params: Any,
  data: input_pipeline.EvalData,
  prefetch: int,
) -> Dict[str, float]:
  """Accuracy and loss over every example of the test split, and those of
  the unshifted images alone (`one_view_*`: the same unless the step
  averages over views, `config.eval_shift`), by `engine`'s compiled
  `eval_step` on its placed `params`."""
  totals = None
  for batch in engine.batches(data.dataset, prefetch):
    sums = jax.device_get(engine.first(eval_step(params, batch)))
    sums = {k: float(v) for k, v in sums.items()}
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


class Evaluation:
  """The evaluations of a run's current parameters.

  Attributes:
    engine: runs the step over the devices (`vit_jax.engine`).
    eval_step: the eval step (`steps.make_eval_step`), compiled by `engine`.
    data: the test split.
    prefetch: batches put on the devices ahead.
    eval_shift: the views averaged per image (0: one view).
    fewshot_evaluator: the few-shot evaluation, if configured.
    writer: where the scalars go.
  """

  def __init__(
    self,
    engine: engine_lib.Engine,
    eval_step: Callable[..., Any],
    data: input_pipeline.EvalData,
    prefetch: int,
    eval_shift: int,
    fewshot_evaluator: Optional[fewshot.Evaluator],
    writer: metrics_lib.MetricWriter,
  ):
    self.engine = engine
    self.eval_step = eval_step
    self.data = data
    self.prefetch = prefetch
    self.eval_shift = eval_shift
    self.fewshot_evaluator = fewshot_evaluator
    self.writer = writer

  def scores(self, state: steps.TrainState) -> Scores:
    """The test scores and few-shot accuracies (None if not configured) of
    the evaluated params (`steps.evaluated_params`) of a placed state."""
    params = steps.evaluated_params(state)
    test = evaluate(
      self.engine, self.eval_step, params, self.data, self.prefetch
    )
    shots = None
    if self.fewshot_evaluator:
      shots = self.fewshot_evaluator(self.engine.gather(params))
    return test, shots

  def __call__(self, step: int, state: steps.TrainState) -> Scores:
    """`scores` at `step`, logged and written."""
    test, shots = self.scores(state)
    logging.info(
      'step %d: test accuracy %.4f over %d examples%s',
      step,
      test['accuracy'],
      test['examples'],
      views_note(test, self.eval_shift, digits=4),
    )
    self.writer.write(step, evaluation_scalars(test, self.eval_shift))
    if shots is not None:
      logging.info(
        'step %d: few-shot linear accuracy %s',
        step,
        fewshot.summary(shots, self.fewshot_evaluator.shots),
      )
      self.writer.write(step, {f'fewshot/{k}': v for k, v in shots.items()})
    return test, shots
