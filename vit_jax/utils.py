"""vit_jax's `utils` entry points, under the names its users call.

  schedule = utils.create_learning_rate_schedule(
      total_steps=10_000, base=0.03, decay_type='cosine', warmup_steps=500)

The project's own functions are `vit_jax.optim.learning_rate_schedule`
(the same schedule) and `vit_jax.optim.from_config`.
"""

from vit_jax import optim


def create_learning_rate_schedule(
  total_steps: int,
  base: float,
  decay_type: str,
  warmup_steps: int,
  linear_end: float = optim.LINEAR_END,
):
  """vit_jax's schedule: a linear warm-up to `base`, then `decay_type`
  ('cosine', 'linear' to `linear_end`, or 'constant'); step -> rate."""
  return optim.learning_rate_schedule(
    base_lr=base,
    total_steps=total_steps,
    warmup_steps=warmup_steps,
    decay_type=decay_type,
    linear_end=linear_end,
  )
