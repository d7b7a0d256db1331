"""The per-device train and eval steps, and how they map onto devices.

The steps are plain functions of one device's batch that reduce over the
named axis `AXIS`; `data_parallel`, `replicate` and `unreplicate` are the only
places that say how they run over devices (today `jax.pmap`), so moving to
`jax.shard_map` touches this file only.
"""

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vit_jax import losses
from vit_jax import trainable as trainable_lib

AXIS = 'batch'
Batch = Dict[str, jnp.ndarray]
Metrics = Dict[str, jnp.ndarray]


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs: the step, params and optimizer state.

  `opt_state` is the optimizer's state of the trainable leaves only.
  """

  step: jnp.ndarray
  params: Any
  opt_state: Any


def initial_state(
  params: Any,
  optimizer: optax.GradientTransformation,
  trainable: trainable_lib.Trainable,
) -> TrainState:
  """The step-0 state; the optimizer sees only the trainable leaves."""
  return TrainState(
    step=jnp.zeros([], jnp.int32),
    params=params,
    opt_state=optimizer.init(trainable_lib.partition(params, trainable)[0]),
  )


def make_train_step(
  loss_fn: losses.LossFn,
  optimizer: optax.GradientTransformation,
  schedule: optax.Schedule,
  trainable: trainable_lib.Trainable,
  *,
  accum_steps: int = 1,
  seed: int = 0,
) -> Callable[[TrainState, Batch], Tuple[TrainState, Metrics]]:
  """One optimizer update from one device's batch `[B, H, W, 3]`.

  Only the `trainable` leaves are differentiated and updated, so the
  backward pass computes no gradient of a frozen weight, and frozen leaves
  pass through untouched. Gradients are averaged over `accum_steps`
  micro-batches and over `AXIS` (`mean_gradients`), then applied: with
  equal micro-batches, the update of the whole batch at once. Dropout keys
  derive from (seed, step, device), so a resumed run draws the same masks.

  Args:
    loss_fn: `loss_fn(params, images, labels, dropout_key)`, a scalar (see
      `losses.classifier_loss`).
    optimizer: applied to the trainable sub-tree.
    schedule: the optimizer's learning rate, reported in the metrics.
    trainable: which leaves train (see `vit_jax.trainable`).
    accum_steps: micro-batches per update; must divide the batch.
    seed: the run's seed, for dropout.
  """

  def train_step(state: TrainState, batch: Batch):
    key = jax.random.fold_in(
      jax.random.fold_in(jax.random.key(seed), state.step),
      jax.lax.axis_index(AXIS),
    )
    params, frozen = trainable_lib.partition(state.params, trainable)
    loss, grads = mean_gradients(
      lambda p, *args: loss_fn(trainable_lib.combine(p, frozen), *args),
      params,
      batch,
      key,
      accum_steps,
    )
    updates, opt_state = optimizer.update(grads, state.opt_state, params)
    params = optax.apply_updates(params, updates)
    all_finite = jnp.all(
      jnp.stack([jnp.isfinite(p).all() for p in jax.tree.leaves(params)])
    )
    metrics = {
      'loss': loss,
      'grad_norm': optax.tree.norm(grads),
      'learning_rate': schedule(state.step),
      # 1 while the updated params are all finite (NaN guard).
      'params_finite': all_finite.astype(jnp.float32),
    }
    new_state = state.replace(
      step=state.step + 1,
      params=trainable_lib.combine(params, frozen),
      opt_state=opt_state,
    )
    return new_state, metrics

  return train_step


def mean_gradients(
  loss_fn: losses.LossFn,
  params: Any,
  batch: Batch,
  key: jax.Array,
  accum_steps: int = 1,
) -> Tuple[jnp.ndarray, Any]:
  """The loss and its gradient w.r.t. `params` on one device's batch,
  both averaged over `accum_steps` micro-batches and then over `AXIS`.

  The micro-batches run in a `lax.scan`, so memory is that of one
  micro-batch; micro-batch `i` draws dropout from `fold_in(key, i)`.
  """

  def accumulate(grad_sum, inputs):
    images, labels, index = inputs
    loss, grads = jax.value_and_grad(loss_fn)(
      params, images, labels, jax.random.fold_in(key, index)
    )
    return jax.tree.map(jnp.add, grad_sum, grads), loss

  zeros = jax.tree.map(jnp.zeros_like, params)
  if accum_steps == 1:
    # No loop: inside a while loop XLA's CPU backend ran ResNet-Mini's
    # convolutions 15x slower.
    grad_sum, loss = accumulate(zeros, (batch['image'], batch['label'], 0))
    micro_losses = loss[None]
  else:
    micro = jax.tree.map(
      lambda x: x.reshape(accum_steps, -1, *x.shape[1:]), batch
    )
    grad_sum, micro_losses = jax.lax.scan(
      accumulate,
      zeros,
      (micro['image'], micro['label'], jnp.arange(accum_steps)),
    )
  grads = jax.lax.pmean(jax.tree.map(lambda g: g / accum_steps, grad_sum), AXIS)
  return jax.lax.pmean(micro_losses.mean(), AXIS), grads


def make_eval_step(model: nn.Module) -> Callable[[Any, Batch], Metrics]:
  """Sums of correct predictions, loss and real examples over all devices."""

  def eval_step(params, batch: Batch) -> Metrics:
    logits = model.apply({'params': params}, batch['image'], train=False)
    sums = losses.eval_sums(logits, batch['label'], batch['mask'])
    return jax.lax.psum(sums, AXIS)

  return eval_step


def replicate(tree: Any, devices: Optional[Sequence[jax.Device]] = None):
  """One copy of `tree` per device, laid out as `data_parallel` expects.

  The copies get the sharding of the step's own outputs (`shard`'s), so
  the state a step returns calls the step compiled for the first state;
  `flax.jax_utils.replicate`'s mesh differs in its axis name, which made
  the train step compile twice.
  """
  devices = devices or jax.local_devices()
  return shard(
    jax.tree.map(
      lambda x: np.broadcast_to(np.asarray(x), (len(devices), *np.shape(x))),
      tree,
    ),
    devices,
  )


def shard(tree: Any, devices: Optional[Sequence[jax.Device]] = None):
  """Puts host arrays `[D, ...]` on the devices, slice i on device i, as
  `data_parallel` expects its batches."""
  devices = devices or jax.local_devices()
  sharding = jax.NamedSharding(
    jax.sharding.Mesh(np.array(devices), (AXIS,)), jax.P(AXIS)
  )
  return jax.device_put(tree, sharding)


def unreplicate(tree: Any) -> Any:
  """The first device's copy of a replicated tree (e.g. to checkpoint it)."""
  return jax.tree.map(lambda x: x[0], tree)


def data_parallel(
  step_fn: Callable,
  *,
  donate_state: bool = False,
  devices: Optional[Sequence[jax.Device]] = None,
) -> Callable:
  """Maps a per-device step over the local devices along `AXIS`.

  The first argument (state or params) and the batch are per-device
  (replicated state, batches `[D, B, ...]`); with `donate_state` the old
  state's buffers are reused for the new one.
  """
  return jax.pmap(
    step_fn,
    axis_name=AXIS,
    devices=devices,
    donate_argnums=(0,) if donate_state else (),
  )
