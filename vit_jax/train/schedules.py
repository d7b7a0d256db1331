"""Learning-rate schedules: linear warm-up, then cosine, linear or constant.

The values equal vit_jax's `create_learning_rate_schedule`: 0 at step 0,
`base_lr` after `warmup_steps`, then a decay that reaches 0 at `total_steps`.
"""

import ml_collections
import optax

DECAY_TYPES = ('cosine', 'linear', 'constant')


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """The schedule of `config.base_lr`, `warmup_steps`, `decay_type`."""
  total, warmup = config.total_steps, config.warmup_steps
  if config.decay_type not in DECAY_TYPES:
    raise ValueError(f'config.decay_type={config.decay_type!r}; choose one of '
                     f'{DECAY_TYPES}.')
  if not 0 <= warmup < total:
    raise ValueError(f'config.warmup_steps={warmup} must be in [0, '
                     f'config.total_steps={total}).')
  decay_steps = total - warmup
  decay = {
      'cosine': optax.cosine_decay_schedule(config.base_lr, decay_steps),
      'linear': optax.linear_schedule(config.base_lr, 0.0, decay_steps),
      'constant': optax.constant_schedule(config.base_lr),
  }[config.decay_type]
  if not warmup:
    return decay
  return optax.join_schedules(
      [optax.linear_schedule(0.0, config.base_lr, warmup), decay], [warmup])
