"""Optimizers from the config: SGD with momentum (vit_jax) or AdamW.

Both clip the global gradient norm first (`config.grad_norm_clip`, None for
no clipping). `config.optim_dtype` sets the dtype of the first-moment state
(SGD momentum, Adam's mu): 'bfloat16' halves the optimizer's memory, as in
vit_jax, where the knob exists but is ignored.

Frozen parameters (fine-tuning modes, see `vit_jax.finetune`) are labelled
in the same tree; `optax.multi_transform` routes them to `set_to_zero`, so
they get no update and no optimizer state, and clipping sees only the
trainable gradients.
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vit_jax.finetune import labels as labels_lib

OPTIMIZERS = ('sgd', 'adamw')


def _decayed(params):
  """AdamW decays weight matrices and embeddings, not biases or norm scales."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config: ml_collections.ConfigDict,
                   schedule: optax.Schedule,
                   labels: Optional[Any] = None
                   ) -> optax.GradientTransformation:
  """The optimizer named by `config.optimizer`, following `schedule`.

  Args:
    config: the experiment config.
    schedule: learning rate per step.
    labels: a tree of `labels_lib.TRAINABLE`/`FROZEN` like the params (or a
      function of the params returning one); None trains every leaf.
  """
  moment_dtype = jnp.dtype(config.optim_dtype)
  if config.optimizer == 'sgd':
    optimizer = optax.sgd(schedule, momentum=0.9,
                          accumulator_dtype=moment_dtype)
  elif config.optimizer == 'adamw':
    optimizer = optax.adamw(schedule, weight_decay=config.weight_decay,
                            mu_dtype=moment_dtype, mask=_decayed)
  else:
    raise ValueError(f'config.optimizer={config.optimizer!r}; choose one of '
                     f'{OPTIMIZERS}.')
  if config.grad_norm_clip is not None:
    optimizer = optax.chain(optax.clip_by_global_norm(config.grad_norm_clip),
                            optimizer)
  if labels is None:
    return optimizer
  return optax.multi_transform(
      {labels_lib.TRAINABLE: optimizer, labels_lib.FROZEN: optax.set_to_zero()},
      labels)
