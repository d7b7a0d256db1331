"""Where a step's time goes: XLA's operations of one compiled step, by kind.

Builds the same step as `scripts/benchmark.py` (the trainer's train step, or
the evaluation forward pass) for one model, crop and batch, traces a few
calls with the JAX profiler and sums the time of every XLA operation the
CPU (or GPU) threads ran, grouped by kind (`ynn_fusion`: matmuls run by
XNNPACK's YNN library; `copy_bitcast_fusion`/`transpose_copy_fusion`:
layout changes; `conv_general_dilated`: convolutions; `multiply_tanh_fusion`:
the GELU; ...). The times are summed over threads, so they can exceed the
wall time of a step when operations run in parallel.

  PYTHONPATH=. python scripts/profile_step.py --model ViT-Ti_16 --batch 32 \
      [--work train|inference] [--dtype float32] [--top 15]
"""

import argparse
import collections
import glob
import re
import statistics
import tempfile
import time
from typing import Dict, Tuple

import benchmark
import jax

# TensorFlow (already the input pipeline's dependency) carries the proto of
# the profiler's trace files.
from tensorflow.tsl.profiler.protobuf import xplane_pb2

# Events of the runtime itself, not operations of the step.
RUNTIME_EVENTS = ('ThunkExecutor', 'SlinkyThreadPool', 'end: ')


def op_seconds(
  trace_dir: str, calls: int
) -> Tuple[Dict[str, float], Dict[str, int]]:
  """Seconds per call and count per call of each kind of XLA operation."""
  paths = glob.glob(f'{trace_dir}/**/*.xplane.pb', recursive=True)
  if not paths:
    raise FileNotFoundError(f'The profiler wrote no trace under {trace_dir}.')
  space = xplane_pb2.XSpace()
  with open(paths[0], 'rb') as f:
    space.ParseFromString(f.read())
  seconds, counts = collections.Counter(), collections.Counter()
  for plane in space.planes:
    names = {key: meta.name for key, meta in plane.event_metadata.items()}
    for line in plane.lines:
      if line.name == 'python':
        continue
      for event in line.events:
        name = names.get(event.metadata_id, '?')
        if name.startswith(RUNTIME_EVENTS):
          continue
        kind = re.sub(r'\.\d+$', '', name)
        seconds[kind] += event.duration_ps / 1e12 / calls
        counts[kind] += 1
  return dict(seconds), {k: round(v / calls) for k, v in counts.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='ViT-Ti_16')
  parser.add_argument('--crop', type=int, default=224)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--work', default='train', choices=benchmark.WORK)
  parser.add_argument(
    '--calls',
    type=int,
    default=2,
    help='traced calls (after two untraced ones)',
  )
  parser.add_argument('--top', type=int, default=15)
  args = parser.parse_args()
  config = benchmark.experiment_config(
    args.model, args.crop, args.batch, args.dtype, 'full'
  )
  workload = benchmark.make_workload(args.work, config)
  for _ in range(2):
    workload.run()
  wall = []
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(args.calls):
        start = time.perf_counter()
        workload.run()
        wall.append(time.perf_counter() - start)
    seconds, counts = op_seconds(trace_dir, args.calls)
  total = sum(seconds.values())
  print(benchmark.machine())
  print(
    f'{args.work} step of {args.model} at {args.crop}, batch '
    f'{args.batch}, {args.dtype}: {statistics.median(wall):.3f} s wall '
    f'per call (traced), {total:.3f} s of XLA operations summed over '
    'threads'
  )
  print(f'{"operation kind":<28} {"s/call":>8} {"share":>6} {"ops/call":>8}')
  for kind, value in sorted(seconds.items(), key=lambda kv: -kv[1])[: args.top]:
    print(
      f'{kind:<28} {value:8.3f} {100 * value / total:5.1f}% {counts[kind]:8d}'
    )


if __name__ == '__main__':
  main()
