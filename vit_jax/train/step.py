"""The per-device train and eval steps, and how they are mapped to devices.

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

from vit_jax.finetune import labels as labels_lib
from vit_jax.train import losses

AXIS = 'batch'
Batch = Dict[str, jnp.ndarray]
Metrics = Dict[str, jnp.ndarray]


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs: the step, params and optimizer state."""
  step: jnp.ndarray
  params: Any
  opt_state: Any


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, *, labels: Optional[Any] = None,
                    accum_steps: int = 1, label_smoothing: float = 0.0,
                    seed: int = 0
                    ) -> Callable[[TrainState, Batch], Tuple[TrainState,
                                                             Metrics]]:
  """One optimizer update from one device's batch `[B, H, W, 3]`.

  Only the leaves `labels` marks trainable (all, if None) are differentiated,
  so the backward pass computes no gradient of a frozen weight and the
  accumulator holds only trainable gradients; frozen leaves are passed
  through untouched. The batch is split into `accum_steps` micro-batches
  whose gradients are averaged (a `lax.scan`, so memory is that of one
  micro-batch); then gradients are averaged over `AXIS` and applied. With
  equal micro-batches this is the update of the whole batch at once. Dropout
  keys derive from (seed, step, device), so a resumed run draws the same
  masks.
  """

  def split(params):
    if labels is None:
      return params, {}
    return labels_lib.partition(params, labels)

  def loss_fn(trainable, frozen, images, targets, key):
    params = labels_lib.combine(trainable, frozen)
    logits = model.apply({'params': params}, images, train=True,
                         rngs={'dropout': key})
    return losses.cross_entropy(logits, targets, label_smoothing)

  def train_step(state: TrainState, batch: Batch):
    key = jax.random.fold_in(jax.random.fold_in(
        jax.random.key(seed), state.step), jax.lax.axis_index(AXIS))
    micro = jax.tree.map(
        lambda x: x.reshape(accum_steps, -1, *x.shape[1:]), batch)
    trainable, frozen = split(state.params)

    def accumulate(grad_sum, inputs):
      images, targets, index = inputs
      loss, grads = jax.value_and_grad(loss_fn)(
          trainable, frozen, images, targets, jax.random.fold_in(key, index))
      return jax.tree.map(jnp.add, grad_sum, grads), loss

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    if accum_steps == 1:
      # No loop: inside a while loop XLA's CPU backend ran ResNet-Mini's
      # convolutions 15x slower (39 s per step instead of 2.6 s).
      grad_sum, loss = accumulate(zeros, (batch['image'], batch['label'], 0))
      micro_losses = loss[None]
    else:
      grad_sum, micro_losses = jax.lax.scan(
          accumulate, zeros,
          (micro['image'], micro['label'], jnp.arange(accum_steps)))
    grads = jax.lax.pmean(
        jax.tree.map(lambda g: g / accum_steps, grad_sum), AXIS)
    # Frozen leaves get constant zero "gradients", which the optimizer's
    # set_to_zero branch never reads.
    all_grads = labels_lib.combine(grads, jax.tree.map(jnp.zeros_like, frozen))
    updates, opt_state = optimizer.update(all_grads, state.opt_state,
                                          state.params)
    trainable = optax.apply_updates(trainable, split(updates)[0])
    new_state = state.replace(step=state.step + 1,
                              params=labels_lib.combine(trainable, frozen),
                              opt_state=opt_state)
    all_finite = jnp.all(jnp.stack([jnp.isfinite(p).all()
                                    for p in jax.tree.leaves(trainable)]))
    metrics = {'loss': jax.lax.pmean(micro_losses.mean(), AXIS),
               'grad_norm': optax.tree.norm(grads),
               'learning_rate': schedule(state.step),
               # 1 while the updated params are all finite (NaN guard).
               'params_finite': all_finite.astype(jnp.float32)}
    return new_state, metrics

  return train_step


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
  return shard(jax.tree.map(
      lambda x: np.broadcast_to(np.asarray(x), (len(devices), *np.shape(x))),
      tree), devices)


def shard(tree: Any, devices: Optional[Sequence[jax.Device]] = None):
  """Puts host arrays `[D, ...]` on the devices, slice i on device i, as
  `data_parallel` expects its batches."""
  devices = devices or jax.local_devices()
  sharding = jax.NamedSharding(jax.sharding.Mesh(np.array(devices), (AXIS,)),
                               jax.P(AXIS))
  return jax.device_put(tree, sharding)


def unreplicate(tree: Any) -> Any:
  """The first device's copy of a replicated tree (e.g. to checkpoint it)."""
  return jax.tree.map(lambda x: x[0], tree)


def data_parallel(step_fn: Callable, *, donate_state: bool = False,
                  devices: Optional[Sequence[jax.Device]] = None) -> Callable:
  """Maps a per-device step over the local devices along `AXIS`.

  The first argument (state or params) and the batch are per-device
  (replicated state, batches `[D, B, ...]`); with `donate_state` the old
  state's buffers are reused for the new one.
  """
  return jax.pmap(step_fn, axis_name=AXIS, devices=devices,
                  donate_argnums=(0,) if donate_state else ())
