"""The train and eval steps, and the `jax.pmap` layout they run in.

The steps are plain functions of the batch they are given. Under
`jax.pmap` (`data_parallel`, with `replicate`/`shard`/`unreplicate` for the
layout) that is one device's share, and they reduce over the named axis
`AXIS`; built with `axis_name=None` they take the global batch of a
`jax.jit` over a mesh and reduce nothing themselves. `vit_jax.engine`
chooses between the two.
"""

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vit_jax import losses
from vit_jax import mixing
from vit_jax import trainable as trainable_lib
from vit_jax import views
from vit_jax.errors import ConfigError

AXIS = 'batch'
# Folded into a step's key for its batch transform's, so that dropout,
# which folds the device and micro-batch indices into the step's key,
# draws what it draws without a transform.
TRANSFORM_FOLD = 0x6D6978  # 'mix'
Batch = Dict[str, jnp.ndarray]
Metrics = Dict[str, jnp.ndarray]


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs: the step, params and optimizer state.

  `opt_state` is the optimizer's state of the trainable leaves only.
  `ema_params`, in a run with an `ema_decay`, is the exponential moving
  average of the trainable leaves over the steps so far (`ema_weight`),
  else None; `evaluated_params` is what evaluation and the saved results
  use.
  """

  step: jnp.ndarray
  params: Any
  opt_state: Any
  ema_params: Any = None


def check_ema_decay(ema_decay: float) -> None:
  """A ConfigError unless 0 <= ema_decay < 1 (0: no moving average)."""
  if not 0 <= ema_decay < 1:
    raise ConfigError(
      f'config.ema_decay={ema_decay} must be in [0, 1): 0 for no moving '
      'average of the weights, or a decay such as 0.999 (an average over '
      'about 1 / (1 - decay) steps).'
    )


def ema_weight(ema_decay: float, update: jnp.ndarray) -> jnp.ndarray:
  """The weight of the new params in the moving average at `update`
  (1, 2, ...): (1 - d) / (1 - d^update).

  This is the bias-corrected average of Adam's moments in closed form: 1
  at the first update, so the initial weights never enter the average, and
  1 - d once `update` >> 1 / (1 - d). After n updates the average is
  sum_i d^(n-i) p_i / sum_i d^(n-i) over the params p_1..p_n.
  """
  decay = jnp.float32(ema_decay)
  return (1 - decay) / (1 - decay ** jnp.asarray(update, jnp.float32))


def evaluated_params(state: TrainState) -> Any:
  """The params to evaluate and keep: the moving averages of the trainable
  leaves with the frozen leaves, or the params themselves without one."""
  if state.ema_params is None:
    return state.params
  return trainable_lib.combine(state.params, state.ema_params)


def initial_state(
  params: Any,
  optimizer: optax.GradientTransformation,
  trainable: trainable_lib.Trainable,
  ema_decay: float = 0.0,
) -> TrainState:
  """The step-0 state; the optimizer, and the moving average if
  `ema_decay` > 0, see only the trainable leaves."""
  check_ema_decay(ema_decay)
  trained = trainable_lib.partition(params, trainable)[0]
  return TrainState(
    step=jnp.zeros([], jnp.int32),
    params=params,
    opt_state=optimizer.init(trained),
    ema_params=jax.tree.map(jnp.copy, trained) if ema_decay else None,
  )


def make_train_step(
  loss_fn: losses.LossFn,
  optimizer: optax.GradientTransformation,
  schedule: optax.Schedule,
  trainable: trainable_lib.Trainable,
  *,
  accum_steps: int = 1,
  seed: int = 0,
  ema_decay: float = 0.0,
  axis_name: Optional[str] = AXIS,
  batch_shards: int = 1,
  batch_transform: Optional[mixing.BatchTransform] = None,
) -> Callable[[TrainState, Batch], Tuple[TrainState, Metrics]]:
  """One optimizer update from a batch `[B, H, W, 3]`.

  Only the `trainable` leaves are differentiated and updated, so the
  backward pass computes no gradient of a frozen weight, and frozen leaves
  pass through untouched. Gradients are averaged over `accum_steps`
  micro-batches and over `axis_name` (`mean_gradients`), then applied:
  with equal micro-batches, the update of the whole batch at once. Dropout
  keys derive from (seed, step, device index along `axis_name`), so a
  resumed run draws the same masks. A `batch_transform` (Mixup, CutMix,
  random erasing: `vit_jax.mixing`) first changes each device's batch
  (`transform_batch`), before it is split into micro-batches, so
  `accum_steps` does not change what it draws.

  Args:
    loss_fn: `loss_fn(params, images, labels, dropout_key)`, a scalar (see
      `losses.classifier_loss`).
    optimizer: applied to the trainable sub-tree.
    schedule: the optimizer's learning rate, reported in the metrics.
    trainable: which leaves train (see `vit_jax.trainable`).
    accum_steps: micro-batches per update; must divide the batch.
    seed: the run's seed, for dropout.
    ema_decay: the decay of the moving average of the trainable leaves
      (`ema_weight`), as in `initial_state`; 0 for none.
    axis_name: the mapped axis of one device's batch (pmap); None for the
      global batch (jit over a mesh).
    batch_shards: the devices a global batch is sharded over (1 under
      pmap), see `mean_gradients`.
    batch_transform: changes the images and labels of each device's batch
      (labels become targets `[B, classes]`); None: the batch as given.
  """

  def train_step(state: TrainState, batch: Batch):
    if (state.ema_params is None) != (ema_decay == 0):
      has = 'without' if state.ema_params is None else 'with'
      raise ValueError(
        f'make_train_step(ema_decay={ema_decay}) got a state {has} moving '
        'averages; build it by initial_state with the same ema_decay.'
      )
    step_key = jax.random.fold_in(jax.random.key(seed), state.step)
    key = step_key
    if axis_name is not None:
      key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
    if batch_transform is not None:
      batch = transform_batch(
        batch_transform,
        batch,
        jax.random.fold_in(step_key, TRANSFORM_FOLD),
        axis_name,
        batch_shards,
      )
    params, frozen = trainable_lib.partition(state.params, trainable)
    loss, grads = mean_gradients(
      lambda p, *args: loss_fn(trainable_lib.combine(p, frozen), *args),
      params,
      batch,
      key,
      accum_steps,
      axis_name,
      batch_shards,
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
    ema_params = state.ema_params
    if ema_params is not None:
      ema_params = optax.incremental_update(
        params, ema_params, ema_weight(ema_decay, state.step + 1)
      )
    new_state = state.replace(
      step=state.step + 1,
      params=trainable_lib.combine(params, frozen),
      opt_state=opt_state,
      ema_params=ema_params,
    )
    return new_state, metrics

  return train_step


def transform_batch(
  transform: mixing.BatchTransform,
  batch: Batch,
  key: jax.Array,
  axis_name: Optional[str] = AXIS,
  batch_shards: int = 1,
) -> Batch:
  """`batch` with its images and labels changed by `transform`, on each
  device's share apart with the key `fold_in(key, device index)`.

  Under pmap (`axis_name`) the share is the batch the step sees; over a
  mesh it is each of the `batch_shards` equal blocks of the global batch.
  Both engines thus draw the same per device, and no image is mixed with
  another device's.
  """

  def one(index, images, labels):
    return transform(jax.random.fold_in(key, index), images, labels)

  if axis_name is not None:
    images, labels = one(
      jax.lax.axis_index(axis_name), batch['image'], batch['label']
    )
    return {**batch, 'image': images, 'label': labels}
  blocks = [
    batch[k].reshape(batch_shards, -1, *batch[k].shape[1:])
    for k in ('image', 'label')
  ]
  images, labels = jax.vmap(one)(jnp.arange(batch_shards), *blocks)
  return {
    **batch,
    'image': images.reshape(-1, *images.shape[2:]),
    'label': labels.reshape(-1, *labels.shape[2:]),
  }


def mean_gradients(
  loss_fn: losses.LossFn,
  params: Any,
  batch: Batch,
  key: jax.Array,
  accum_steps: int = 1,
  axis_name: Optional[str] = AXIS,
  batch_shards: int = 1,
) -> Tuple[jnp.ndarray, Any]:
  """The loss and its gradient w.r.t. `params` on a batch, both averaged
  over `accum_steps` micro-batches and then over `axis_name` (if any).

  The micro-batches run in a `lax.scan`, so memory is that of one
  micro-batch; micro-batch `i` draws dropout from `fold_in(key, i)`. The
  batch is `batch_shards` equal blocks (a global batch's shards, one per
  device of a mesh), and micro-batch `i` is the `i`-th part of each: the
  micro-batches of `jax.pmap`'s devices, and no example leaves its device.
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
      lambda x: (
        x.reshape(batch_shards, accum_steps, -1, *x.shape[1:])
        .swapaxes(0, 1)
        .reshape(accum_steps, -1, *x.shape[1:])
      ),
      batch,
    )
    grad_sum, micro_losses = jax.lax.scan(
      accumulate,
      zeros,
      (micro['image'], micro['label'], jnp.arange(accum_steps)),
    )
  grads = jax.tree.map(lambda g: g / accum_steps, grad_sum)
  loss = micro_losses.mean()
  if axis_name is None:
    return loss, grads
  return jax.lax.pmean(loss, axis_name), jax.lax.pmean(grads, axis_name)


def make_eval_step(
  model: nn.Module, eval_shift: int = 0, axis_name: Optional[str] = AXIS
) -> Callable[[Any, Batch], Metrics]:
  """Sums of correct predictions, loss and real examples over the batch,
  and over the devices of `axis_name` (pmap; None: a global batch).

  With `eval_shift` > 0 the predictions are the mean softmax over the
  shifted views of each image (`vit_jax.views`), and `one_view_correct`
  and `one_view_loss` sum those of the unshifted image alone."""

  def eval_step(params, batch: Batch) -> Metrics:
    def logits_fn(images):
      return model.apply({'params': params}, images, train=False)

    labels, mask = batch['label'], batch['mask']
    if not eval_shift:
      return total(losses.eval_sums(logits_fn(batch['image']), labels, mask))
    logits = views.view_logits(logits_fn, batch['image'], eval_shift)
    one_view = losses.eval_sums(logits[0], labels, mask)
    sums = losses.eval_sums(views.mean_log_probabilities(logits), labels, mask)
    sums['one_view_correct'] = one_view['correct']
    sums['one_view_loss'] = one_view['loss']
    return total(sums)

  def total(sums: Metrics) -> Metrics:
    return sums if axis_name is None else jax.lax.psum(sums, axis_name)

  return eval_step


def replicate(tree: Any, devices: Optional[Sequence[jax.Device]] = None):
  """One copy of `tree` per device, laid out as `data_parallel` expects.

  The copies get the sharding of the step's own outputs (`shard`'s), so
  the state a step returns calls the step compiled for the first state;
  `flax.jax_utils.replicate`'s mesh differs in its axis name, which made
  the train step compile twice. Every device gets a buffer of its own: on
  CPU, device-putting a view of a `jax.Array`'s memory gave all devices
  that one buffer, which a donating step then overwrote from each device.
  """
  devices = devices or jax.local_devices()
  return shard(
    jax.tree.map(
      lambda x: np.repeat(np.asarray(x)[None], len(devices), axis=0),
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
