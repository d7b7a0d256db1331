"""How the train and eval steps run over the devices: `config.engine`.

The steps (`vit_jax.steps`) are written once, for the batch they are given.
An engine decides what that batch is and how the state is laid out:

- 'pmap' (vit_jax's, the default): `jax.pmap` over this host's devices.
  Each device runs the step on its share of the batch and holds a whole
  copy of the state; the step averages gradients and sums metrics over the
  named axis `steps.AXIS`.
- 'mesh': `jax.jit` over a `jax.sharding.Mesh` of every device of every
  host. The step sees the global batch as one array sharded along the
  mesh axis, XLA partitions the computation, and the step names no axis.
  With `config.fsdp` the parameters, optimizer state and moving average are
  sharded over the devices too (`fsdp_spec`), so each device holds about
  1/N of the state; without it they are replicated.

The trainer and the benchmarks talk to an engine only through `Engine`:
place a state or batch on the devices, compile a step, and take states and
params back for checkpoints, task files and host-side evaluation.
"""

import abc
import collections
from typing import Any, Callable, Dict, Iterator, Optional, Sequence

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tensorflow as tf

from vit_jax import input_pipeline
from vit_jax import steps
from vit_jax.errors import ConfigError

ENGINES = ('pmap', 'mesh')
# Leaves with fewer elements are replicated under FSDP: biases and norms
# cost little memory, and sharding them would only add collectives.
FSDP_MIN_SIZE = 2**16


def fsdp_spec(
  shape: Sequence[int], num_devices: int, min_size: int = FSDP_MIN_SIZE
) -> jax.P:
  """How FSDP shards a leaf of `shape` over `num_devices`: along its largest
  dimension that the device count divides (the first of equal ones), or
  not at all (`P()`, replicated) for a leaf of fewer than `min_size`
  elements or with no such dimension."""
  if int(np.prod(shape)) < min_size:
    return jax.P()
  divisible = [d for d in range(len(shape)) if shape[d] % num_devices == 0]
  if not divisible:
    return jax.P()
  largest = max(divisible, key=lambda d: (shape[d], -d))
  return jax.P(
    *(steps.AXIS if d == largest else None for d in range(len(shape)))
  )


class Engine(abc.ABC):
  """Runs the steps over devices; see the module docstring.

  Attributes:
    axis_name: the named axis the steps reduce over (`steps.AXIS` under
      pmap), None when the step sees the global batch (mesh).
    batch_shards: the devices one step's batch is sharded over (1 under
      pmap, where a step sees one device's share).
  """

  axis_name: Optional[str]
  batch_shards: int

  @abc.abstractmethod
  def train_step(self, step_fn: Callable) -> Callable:
    """`step_fn(state, batch) -> (state, metrics)` compiled for placed
    states and batches; the old state's buffers are donated to the new."""

  @abc.abstractmethod
  def eval_step(self, step_fn: Callable) -> Callable:
    """`step_fn(params, batch) -> sums` compiled for placed params and
    batches."""

  @abc.abstractmethod
  def place(self, tree: Any) -> Any:
    """A state or params (host or device arrays, or what `restore_target`
    restored) laid out on the devices as the compiled steps take them."""

  @abc.abstractmethod
  def put_batch(self, batch: Dict[str, np.ndarray]) -> Dict[str, jax.Array]:
    """This host's batch, laid out per local device (`[devices, b, ...]`,
    as the input pipeline makes it), on the devices."""

  @abc.abstractmethod
  def first(self, outputs: Any) -> Any:
    """A step's metrics or sums as one value each (the same on every
    device)."""

  @abc.abstractmethod
  def saveable(self, placed: Any) -> Any:
    """A placed state in the form a checkpoint stores: global arrays, the
    same whatever the engine and device count."""

  @abc.abstractmethod
  def restore_target(self, state: Any) -> Any:
    """What `TrainCheckpointer.restore` fills: `state`'s structure and
    shapes, restored straight into this engine's layout where it has one."""

  @abc.abstractmethod
  def gather(self, placed: Any) -> Any:
    """Whole arrays of a placed tree on this host's first device, for the
    host-side users of params: task files, few-shot, feature caching."""

  def batches(
    self, dataset: tf.data.Dataset, prefetch: int
  ) -> Iterator[Dict[str, jax.Array]]:
    """Iterates `dataset`'s batches placed on the devices, `prefetch` of
    them put ahead (at least one) so the copy overlaps the step."""
    queue = collections.deque()
    for batch in dataset.as_numpy_iterator():
      queue.append(self.put_batch(batch))
      if len(queue) > max(prefetch, 1):
        yield queue.popleft()
    yield from queue


class PmapEngine(Engine):
  """vit_jax's data-parallel `jax.pmap`: each host maps the step over its
  local devices (or `devices`, one host only), reducing over all hosts'."""

  axis_name = steps.AXIS
  batch_shards = 1

  def __init__(self, devices: Optional[Sequence[jax.Device]] = None):
    # None: pmap's default, every device of every host (this host's run
    # the step), which is what makes its reductions span the hosts.
    self.devices = devices

  def train_step(self, step_fn: Callable) -> Callable:
    return steps.data_parallel(step_fn, donate_state=True, devices=self.devices)

  def eval_step(self, step_fn: Callable) -> Callable:
    return steps.data_parallel(step_fn, devices=self.devices)

  def place(self, tree: Any) -> Any:
    return steps.replicate(tree, self.devices)

  def put_batch(self, batch: Dict[str, np.ndarray]) -> Dict[str, jax.Array]:
    return steps.shard(batch, self.devices)

  def first(self, outputs: Any) -> Any:
    return steps.unreplicate(outputs)

  def saveable(self, placed: Any) -> Any:
    return steps.unreplicate(placed)

  def restore_target(self, state: Any) -> Any:
    return state

  def gather(self, placed: Any) -> Any:
    return steps.unreplicate(placed)

  def batches(
    self, dataset: tf.data.Dataset, prefetch: int
  ) -> Iterator[Dict[str, jax.Array]]:
    return input_pipeline.device_prefetch(dataset, prefetch)


class MeshEngine(Engine):
  """`jax.jit` over a one-axis mesh of `devices` (default: every device of
  every host); with `fsdp`, state leaves sharded by `fsdp_spec`."""

  axis_name = None

  def __init__(
    self,
    devices: Optional[Sequence[jax.Device]] = None,
    fsdp: bool = False,
    fsdp_min_size: int = FSDP_MIN_SIZE,
  ):
    self.mesh = jax.sharding.Mesh(
      np.asarray(devices or jax.devices()), (steps.AXIS,)
    )
    self.batch_shards = self.mesh.size
    self.fsdp = fsdp
    self.fsdp_min_size = fsdp_min_size
    self._replicated = jax.NamedSharding(self.mesh, jax.P())
    self._batch_sharding = jax.NamedSharding(self.mesh, jax.P(steps.AXIS))

  def shardings(self, tree: Any) -> Any:
    """The sharding of each leaf of a state or params `tree` (arrays or
    shapes): `fsdp_spec`'s with FSDP, else replicated."""
    if not self.fsdp:
      return jax.tree.map(lambda _: self._replicated, tree)
    return jax.tree.map(
      lambda leaf: jax.NamedSharding(
        self.mesh,
        fsdp_spec(np.shape(leaf), self.mesh.size, self.fsdp_min_size),
      ),
      tree,
    )

  def _constrained(self, tree: Any) -> Any:
    """`tree` (traced) held to `shardings`, so the state a step returns
    keeps the layout of the state it took."""
    return jax.lax.with_sharding_constraint(tree, self.shardings(tree))

  def train_step(self, step_fn: Callable) -> Callable:
    def constrained_step(state, batch):
      state, metrics = step_fn(self._constrained(state), batch)
      return self._constrained(state), metrics

    return jax.jit(
      constrained_step,
      out_shardings=(None, self._replicated),
      donate_argnums=(0,),
    )

  def eval_step(self, step_fn: Callable) -> Callable:
    return jax.jit(
      lambda params, batch: step_fn(self._constrained(params), batch),
      out_shardings=self._replicated,
    )

  def place(self, tree: Any) -> Any:
    def put(leaf, sharding):
      if isinstance(leaf, jax.Array) and (
        jax.process_count() == 1 or not leaf.is_fully_addressable
      ):
        # A copy: the train step donates what it is given.
        return jax.device_put(leaf, sharding, may_alias=False)
      host = np.asarray(leaf)  # The same on every host.
      return jax.make_array_from_callback(
        host.shape, sharding, lambda index: host[index]
      )

    return jax.tree.map(put, tree, self.shardings(tree))

  def put_batch(self, batch: Dict[str, np.ndarray]) -> Dict[str, jax.Array]:
    return {
      key: jax.make_array_from_process_local_data(
        self._batch_sharding,
        np.reshape(value, (-1, *np.shape(value)[2:])),
      )
      for key, value in batch.items()
    }

  def abstract_batch(self, shapes: Any) -> Any:
    """A global batch of `jax.ShapeDtypeStruct`s (`[batch, ...]`) with the
    batch's sharding: to compile or export the steps from shapes."""
    return jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(
        leaf.shape, leaf.dtype, sharding=self._batch_sharding
      ),
      shapes,
    )

  def first(self, outputs: Any) -> Any:
    return outputs

  def saveable(self, placed: Any) -> Any:
    return placed

  def restore_target(self, state: Any) -> Any:
    return jax.tree.map(
      lambda leaf, sharding: jax.ShapeDtypeStruct(
        np.shape(leaf), leaf.dtype, sharding=sharding
      ),
      state,
      self.shardings(state),
    )

  def gather(self, placed: Any) -> Any:
    first_device = jax.local_devices()[0]

    def whole(leaf):
      if not leaf.is_fully_addressable:
        leaf = multihost_utils.process_allgather(leaf, tiled=True)
      return jax.device_put(leaf, first_device)

    return jax.tree.map(whole, placed)


def check_config(config: ml_collections.ConfigDict) -> None:
  """ConfigErrors for an unknown engine, or FSDP without the mesh engine."""
  if config.engine not in ENGINES:
    raise ConfigError(
      f'config.engine={config.engine!r}; use one of {", ".join(ENGINES)}.'
    )
  if config.fsdp and config.engine != 'mesh':
    raise ConfigError(
      'config.fsdp=True shards the state over the devices of a mesh; set '
      'config.engine=mesh with it.'
    )
  if config.fsdp_min_size < 0:
    raise ConfigError(
      f'config.fsdp_min_size={config.fsdp_min_size} must be >= 0 (leaves '
      'with fewer elements are replicated).'
    )


def from_config(
  config: ml_collections.ConfigDict,
  devices: Optional[Sequence[jax.Device]] = None,
) -> Engine:
  """The engine of `config.engine` (and `config.fsdp`) over `devices`
  (default: this host's for pmap, every host's for the mesh)."""
  check_config(config)
  if config.engine == 'pmap':
    return PmapEngine(devices)
  return MeshEngine(devices, config.fsdp, config.fsdp_min_size)
