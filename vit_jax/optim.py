"""Learning-rate schedules and optimizers, from explicit settings.

Schedules are vit_jax's `create_learning_rate_schedule`: a linear warm-up
from 0 to `base_lr`, then cosine, linear or constant decay. Optimizers are
SGD with momentum (vit_jax) or AdamW, both after clipping the global
gradient norm. `moment_dtype` is the dtype of the first-moment state (SGD
momentum, Adam's mu): bfloat16 halves the optimizer's memory, as vit_jax's
`optim_dtype` intends.

The optimizer is built for, and applied to, the trainable sub-tree only
(`trainable.partition`): frozen leaves have no optimizer state and are
never updated.
"""

from typing import Any, Mapping, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import optax

from vit_jax.errors import ConfigError

DECAY_TYPES = ('cosine', 'linear', 'constant')
# Where vit_jax's linear decay ends (`linear_end` of its
# `create_learning_rate_schedule`), whatever base_lr is.
LINEAR_END = 1e-5
OPTIMIZERS = ('sgd', 'adamw')


def learning_rate_schedule(
  *,
  base_lr: float,
  total_steps: int,
  warmup_steps: int,
  decay_type: str = 'cosine',
  linear_end: float = LINEAR_END,
) -> optax.Schedule:
  """0 at step 0, `base_lr` after `warmup_steps`, then decayed: to 0 at the
  end (cosine), to `linear_end` (linear), or not at all (constant).

  A run no longer than its warm-up (e.g. vit_jax's one-step test with the
  default 500 warm-up steps) warms up throughout: the rate rises as
  `base_lr * step / warmup_steps` and never decays (vit_jax's formula runs
  such a cosine schedule at 0), with a warning.
  """
  if decay_type not in DECAY_TYPES:
    raise ConfigError(
      f'config.decay_type={decay_type!r}; choose one of {DECAY_TYPES}.'
    )
  if warmup_steps < 0:
    raise ConfigError(f'config.warmup_steps={warmup_steps} must be >= 0.')
  warmup = optax.linear_schedule(0.0, base_lr, warmup_steps)
  if warmup_steps >= total_steps:
    logging.warning(
      'config.warmup_steps=%d >= config.total_steps=%d: the learning rate '
      'warms up throughout and ends at %g, below base_lr=%g.',
      warmup_steps,
      total_steps,
      base_lr * total_steps / warmup_steps,
      base_lr,
    )
    return warmup
  decay_steps = total_steps - warmup_steps
  decay = {
    'cosine': optax.cosine_decay_schedule(base_lr, decay_steps),
    'linear': optax.linear_schedule(base_lr, linear_end, decay_steps),
    'constant': optax.constant_schedule(base_lr),
  }[decay_type]
  if not warmup_steps:
    return decay
  return optax.join_schedules([warmup, decay], [warmup_steps])


def _decayed(params):
  """AdamW decays weight matrices and embeddings, not biases or norm scales."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(
  name: str,
  schedule: optax.Schedule,
  *,
  weight_decay: float = 0.0,
  grad_norm_clip: float | None = None,
  moment_dtype: str = 'float32',
) -> optax.GradientTransformation:
  """SGD with momentum 0.9 or AdamW following `schedule`, after clipping.

  Args:
    name: 'sgd' or 'adamw' (`config.optimizer`).
    schedule: learning rate per step.
    weight_decay: AdamW's decoupled weight decay (unused by SGD).
    grad_norm_clip: the global gradient norm is clipped to this; None for
      no clipping.
    moment_dtype: dtype of the momentum / first-moment state.
  """
  dtype = jnp.dtype(moment_dtype)
  if name == 'sgd':
    optimizer = optax.sgd(schedule, momentum=0.9, accumulator_dtype=dtype)
  elif name == 'adamw':
    optimizer = optax.adamw(
      schedule, weight_decay=weight_decay, mu_dtype=dtype, mask=_decayed
    )
  else:
    raise ConfigError(f'config.optimizer={name!r}; choose one of {OPTIMIZERS}.')
  if grad_norm_clip is None:
    return optimizer
  return optax.chain(optax.clip_by_global_norm(grad_norm_clip), optimizer)


def from_config(
  config: Mapping[str, Any],
) -> Tuple[optax.Schedule, optax.GradientTransformation]:
  """The schedule and optimizer of an experiment config's optimizer keys
  (`base_lr`, `total_steps`, `warmup_steps`, `decay_type`, `optimizer`,
  `weight_decay`, `grad_norm_clip`, `optim_dtype`), so the training job and
  the benchmarks build the same ones."""
  schedule = learning_rate_schedule(
    base_lr=config['base_lr'],
    total_steps=config['total_steps'],
    warmup_steps=config['warmup_steps'],
    decay_type=config['decay_type'],
  )
  optimizer = make_optimizer(
    config['optimizer'],
    schedule,
    weight_decay=config['weight_decay'],
    grad_norm_clip=config['grad_norm_clip'],
    moment_dtype=config['optim_dtype'],
  )
  return schedule, optimizer
