"""Measuring speed: the trainer's own forward and train steps, timed alike.

A `Workload` is one blocking call of a compiled step on fixed inputs, with
the FLOPs XLA counts for it and the memory XLA assigns to it. `time_rounds`
runs several workloads in alternation (A B A B ...) after a warm-up, so a
machine whose load drifts slows all of them alike, and ratios between them
stay meaningful; `matmul_peak` measures what this machine's matmul reaches,
the yardstick for achieved FLOP/s. The `inference_time` job and the
benchmark scripts use these, so every figure they print is measured one way.
"""

import dataclasses
import statistics
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax import engine as engine_lib
from vit_jax import experiment
from vit_jax import finetune
from vit_jax import steps
from vit_jax import trainable as trainable_lib
from vit_jax.models import table

# The matmul sizes `matmul_peak` tries: large enough to reach the peak of
# a CPU or GPU, small enough to time in seconds on 2 CPU cores.
PEAK_SIZES = (1024, 2048, 4096)


@dataclasses.dataclass
class Workload:
  """One step to time.

  Attributes:
    run: makes one call and blocks until its results are ready.
    images: images processed per call (all devices).
    flops: FLOPs per call as XLA counts them before optimisation (2 per
      multiply-add; the model's FLOPs, no recomputation), all devices.
    memory_bytes: XLA's buffer assignment for one device: arguments, outputs
      and temporaries, less what donation aliases.
    params: the model's parameter count.
    trainable_params: how many of them the step updates (0 for inference).
    hlo_text: the compiled step's HLO, as text (operation names, shapes).
  """

  run: Callable[[], None]
  images: int
  flops: float
  memory_bytes: int
  params: int
  trainable_params: int = 0
  hlo_text: Callable[[], str] = str


def _cost(lowered: jax.stages.Lowered) -> Dict[str, float]:
  """XLA's cost analysis of a lowered computation (one dict)."""
  analysis = lowered.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older JAX: one per device.
    analysis = analysis[0]
  return analysis


def _memory_bytes(compiled: jax.stages.Compiled) -> int:
  """Peak bytes of one device's buffers, from XLA's memory analysis."""
  stats = compiled.memory_analysis()
  if isinstance(stats, (list, tuple)):
    stats = stats[0]
  return int(
    stats.argument_size_in_bytes
    + stats.output_size_in_bytes
    + stats.temp_size_in_bytes
    - stats.alias_size_in_bytes
  )


def _workload(
  step: Callable,
  first: Any,
  rest: Sequence[Any],
  images: int,
  mapped_devices: int,
  donated: bool,
  params: int,
  trainable_params: int = 0,
) -> Workload:
  """Compiles `step(first, *rest)` once and wraps it as a `Workload`.

  `mapped_devices` is how many devices a `jax.pmap`ped step runs on (XLA
  counts one device's FLOPs), 1 for a step compiled for all of them
  (`jax.jit` over a mesh). With `donated`, each call's first output
  replaces `first` (a train state whose buffers the step reuses).
  """
  lowered = step.lower(first, *rest)
  compiled = lowered.compile()
  holder = [first]

  def run() -> None:
    outputs = compiled(holder[0], *rest)
    if donated:
      holder[0] = outputs[0]
    jax.block_until_ready(outputs)

  return Workload(
    run,
    images,
    _cost(lowered)['flops'] * mapped_devices,
    _memory_bytes(compiled),
    params,
    trainable_params,
    compiled.as_text,
  )


def host_batch(
  batch: int, crop: int, num_classes: int, num_devices: int
) -> Dict[str, np.ndarray]:
  """A fixed batch of `batch` random images and labels on the host, laid
  out per device as the input pipeline makes it (`[num_devices, batch /
  num_devices, crop, crop, 3]`)."""
  if batch % num_devices:
    raise ValueError(
      f'Batch {batch} does not split over {num_devices} '
      'devices; use a multiple of the device count.'
    )
  rng = np.random.default_rng(0)
  shape = [num_devices, batch // num_devices]
  return {
    'image': rng.uniform(-1, 1, shape + [crop, crop, 3]).astype(np.float32),
    'label': rng.integers(0, num_classes, shape).astype(np.int32),
  }


def synthetic_batch(
  batch: int, crop: int, num_classes: int, devices: Sequence[jax.Device]
) -> Dict[str, jax.Array]:
  """`host_batch` split over `devices` as `jax.pmap` takes it."""
  return steps.shard(
    host_batch(batch, crop, num_classes, len(devices)), devices
  )


def forward_workload(
  model,
  params: Any,
  batch: int,
  crop: int,
  devices: Optional[Sequence[jax.Device]] = None,
) -> Workload:
  """The evaluation forward pass (`train=False`) on `batch` images."""
  devices = devices or jax.local_devices()
  forward = steps.data_parallel(
    lambda p, x: model.apply({'params': p}, x, train=False), devices=devices
  )
  images = synthetic_batch(batch, crop, 1, devices)['image']
  return _workload(
    forward,
    steps.replicate(params, devices),
    [images],
    batch,
    len(devices),
    donated=False,
    params=table.count_params(params),
  )


def train_step_and_state(
  config: ml_collections.ConfigDict,
  num_classes: int,
  devices: Sequence[jax.Device],
) -> Tuple[Callable, steps.TrainState, engine_lib.Engine]:
  """The trainer's train step for `config` over `devices`, built by
  `experiment.build` and compiled by the engine of `config.engine` as in
  `vit_jax.train`; its step-0 state (randomly initialised weights), placed
  by that engine; and the engine (whose `put_batch` places batches)."""
  if config.finetune.cache_features:
    raise ValueError(
      'config.finetune.cache_features=True trains on features, which the '
      'benchmark does not make; time it with cache_features=False.'
    )
  exp = experiment.build(config, num_classes, devices=devices)
  engine = exp.engine
  return engine.train_step(exp.train_step), engine.place(exp.state), engine


def train_workload(
  config: ml_collections.ConfigDict,
  num_classes: int,
  devices: Optional[Sequence[jax.Device]] = None,
) -> Workload:
  """`train_step_and_state`'s step on a fixed batch of `config.batch`."""
  devices = devices or jax.local_devices()
  step, state, engine = train_step_and_state(config, num_classes, devices)
  # Global arrays (no copy), whatever the engine's layout: their sizes.
  params = engine.saveable(state).params
  trainable = finetune.from_config(config.finetune).is_trainable
  data = engine.put_batch(
    host_batch(config.batch, config.pp.crop, num_classes, len(devices))
  )
  return _workload(
    step,
    state,
    [data],
    config.batch,
    len(devices) if engine.axis_name else 1,
    donated=True,
    params=trainable_lib.count(params),
    trainable_params=trainable_lib.count(params, trainable),
  )


def time_rounds(
  runs: Mapping[str, Callable[[], None]],
  rounds: int,
  warmup: int = 2,
  settle: int = 0,
) -> Dict[str, List[float]]:
  """Seconds of each call, the callables alternating round by round.

  Each callable first runs `warmup` untimed times (compilation, caches);
  then every round calls each once, in the given order, after `settle`
  untimed calls of the same one (so a small step is not timed right after a
  large one has evicted its caches and memory).
  """
  if rounds < 1:
    raise ValueError(f'rounds={rounds}; time at least one round.')
  for run in runs.values():
    for _ in range(warmup):
      run()
  seconds: Dict[str, List[float]] = {name: [] for name in runs}
  for _ in range(rounds):
    for name, run in runs.items():
      for _ in range(settle):
        run()
      start = time.perf_counter()
      run()
      seconds[name].append(time.perf_counter() - start)
  return seconds


def matmul_peak(
  dtype: Any = jnp.float32,
  sizes: Sequence[int] = PEAK_SIZES,
  rounds: int = 5,
  device: Optional[jax.Device] = None,
) -> Dict[str, float]:
  """The best FLOP/s of one device's square matmuls of `sizes`.

  Returns {'flops_per_s': best median FLOP/s, 'size': its matrix size}.
  """
  device = device or jax.local_devices()[0]
  matmul = jax.jit(jnp.matmul)
  best = {'flops_per_s': 0.0, 'size': 0}
  for size in sizes:
    a, b = (
      jax.device_put(jnp.ones((size, size), dtype) / size, device)
      for _ in range(2)
    )
    seconds = time_rounds(
      {'matmul': lambda a=a, b=b: matmul(a, b).block_until_ready()},
      rounds,
      warmup=1,
    )['matmul']
    achieved = 2 * size**3 / statistics.median(seconds)
    if achieved > best['flops_per_s']:
      best = {'flops_per_s': achieved, 'size': size}
  return best
