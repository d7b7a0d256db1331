"""What a run builds from its config before the first step.

`build` makes the model, its initial parameters, the fine-tuning mode (the
run's one decision of what trains), the optimizer, the step-0 train state
and the per-device train and eval step functions. The trainer
(`vit_jax.train`) and the benchmarks (`vit_jax.benchmarks.timing`) both
call it, so a benchmark times the very step a run trains with: its moving
average, seed, accumulation, batch mixing (`vit_jax.mixing`) and, with
`config.finetune.cache_features`, the head-only loss on features. The
steps are returned uncompiled, built for the run's engine
(`config.engine`), which compiles them and lays out states and batches on
the devices.
"""

import dataclasses
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import ml_collections
import optax

from vit_jax import engine as engine_lib
from vit_jax import features
from vit_jax import finetune
from vit_jax import losses
from vit_jax import mixing
from vit_jax import optim
from vit_jax import steps
from vit_jax.checkpoint import pretrained
from vit_jax.models import heads


@dataclasses.dataclass
class Experiment:
  """The parts of a run that its config determines.

  Attributes:
    model: the model, with the fine-tuning mode's injected modules.
    finetune: the fine-tuning mode; `finetune.is_trainable` decides which
      leaves train.
    schedule: the learning rate by step.
    optimizer: the update rule of the trainable leaves.
    state: the step-0 train state (initial or pretrained params), on the
      host's default device.
    engine: runs the steps over the devices (`vit_jax.engine`).
    train_step: `(state, batch) -> (state, metrics)`, for `engine`.
    eval_step: `(params, batch) -> sums`, for `engine`.
  """

  model: nn.Module
  finetune: finetune.Finetune
  schedule: optax.Schedule
  optimizer: optax.GradientTransformation
  state: steps.TrainState
  engine: engine_lib.Engine
  train_step: Callable[..., Any]
  eval_step: Callable[..., Any]

  @property
  def trainable(self) -> Callable[[str], bool]:
    """Whether the leaf at a path trains."""
    return self.finetune.is_trainable


def build(
  config: ml_collections.ConfigDict,
  num_classes: int,
  pretrained_path: Optional[str] = None,
  devices: Optional[Sequence[jax.Device]] = None,
  abstract: bool = False,
) -> Experiment:
  """The `Experiment` of `config` for `num_classes` classes, starting from
  `pretrained_path` (None: random initialisation, seeded by config.seed),
  its steps run by `config.engine` over `devices` (default: all).

  With `abstract`, the state is shapes and dtypes only
  (`jax.ShapeDtypeStruct`s, nothing initialised or loaded): enough to
  compile the steps and ask XLA what they cost, for models that do not fit
  this host.

  ConfigErrors, before anything compiles, for a fine-tuning mode the
  params do not fit and for features that cannot be cached.
  """
  engine = engine_lib.from_config(config, devices)
  fine = finetune.from_config(config.finetune)
  model = finetune.build_model(config, num_classes, fine)
  schedule, optimizer = optim.from_config(config)

  def initial_state() -> steps.TrainState:
    params = pretrained.init_params(
      model,
      config.pp.crop,
      seed=config.seed,
      pretrained_path=pretrained_path,
      model_config=config.model,
      is_added=fine.is_added,
    )
    return steps.initial_state(
      params, optimizer, fine.is_trainable, config.ema_decay
    )

  state = jax.eval_shape(initial_state) if abstract else initial_state()
  fine.check(state.params)
  cache_features = config.finetune.cache_features
  if cache_features:
    features.check_cacheable(config, model, state.params, fine.is_trainable)
  train_step = steps.make_train_step(
    losses.classifier_loss(
      heads.Head.of(model) if cache_features else model,
      config.label_smoothing,
    ),
    optimizer,
    schedule,
    fine.is_trainable,
    accum_steps=config.accum_steps,
    seed=config.seed,
    ema_decay=config.ema_decay,
    axis_name=engine.axis_name,
    batch_shards=engine.batch_shards,
    batch_transform=mixing.from_config(config, num_classes),
  )
  return Experiment(
    model=model,
    finetune=fine,
    schedule=schedule,
    optimizer=optimizer,
    state=state,
    engine=engine,
    train_step=train_step,
    eval_step=steps.make_eval_step(
      model, config.eval_shift, axis_name=engine.axis_name
    ),
  )
