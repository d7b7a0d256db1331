"""What a run starts from: its model, initial parameters, optimizer and state.

Kept apart from the training loop (and free of the TensorFlow input
pipeline), so benchmarks and tools build exactly the trainer's model and
step from a config on machines that have only JAX.
"""

import dataclasses
import os
from typing import Any, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import optax

from vit_jax import checkpoint
from vit_jax import finetune
from vit_jax.finetune import labels as labels_lib
from vit_jax.train import optimizers
from vit_jax.train import schedules
from vit_jax.train import step as step_lib


def pretrained_path(config: ml_collections.ConfigDict) -> Optional[str]:
  """`config.pretrained_path`, else `pretrained_dir/{model_name}.npz`."""
  if config.pretrained_path:
    return config.pretrained_path
  if config.pretrained_dir:
    return os.path.join(config.pretrained_dir,
                        f'{config.model.model_name}.npz')
  return None


def init_params(model, crop: int, config: ml_collections.ConfigDict,
                fine: Optional[finetune.Finetune] = None):
  """Fresh params, then the pretrained checkpoint's if one is configured.

  Leaves the fine-tuning mode adds (injected parameters) are not in the
  checkpoint; they keep their initial values.
  """
  params = jax.jit(lambda key: model.init(
      key, jnp.zeros([1, crop, crop, 3]), train=False)['params'])(
          jax.random.key(config.seed))
  path = pretrained_path(config)
  if path is None:
    logging.info('No pretrained checkpoint configured: training from scratch.')
    return params
  logging.info('Initialising from %s', path)
  is_added = fine.is_added if fine else lambda _: False
  added, base = labels_lib.split(params, is_added)
  loaded = checkpoint.load_pretrained(pretrained_path=path, init_params=base,
                                      model_config=config.model)
  return labels_lib.combine(loaded, added)


@dataclasses.dataclass(frozen=True)
class Setup:
  """The model and optimizer of a run, its initial state and what trains."""
  model: Any
  schedule: optax.Schedule
  optimizer: optax.GradientTransformation
  state: step_lib.TrainState
  finetune: finetune.Finetune
  labels: Any


def create_setup(config: ml_collections.ConfigDict, num_classes: int) -> Setup:
  """Builds the model, schedule, optimizer and step-0 state from `config`."""
  fine = finetune.from_config(config.finetune)
  model = finetune.build_model(config, num_classes, fine)
  params = init_params(model, config.pp.crop, config, fine)
  if fine.mode != 'full' and pretrained_path(config) is None:
    logging.warning('config.finetune.mode=%r without a pretrained checkpoint:'
                    ' the frozen weights are random.', fine.mode)
  labels = labels_lib.label_params(params, fine.is_trainable)
  schedule = schedules.learning_rate_schedule(config)
  optimizer = optimizers.make_optimizer(config, schedule, labels)
  state = step_lib.TrainState(step=jnp.zeros([], jnp.int32), params=params,
                              opt_state=optimizer.init(params))
  logging.info('Fine-tuning mode %s: %d of %d parameters train.',
               fine.describe(), labels_lib.count(params, labels),
               labels_lib.count(params, labels, None))
  return Setup(model, schedule, optimizer, state, fine, labels)
