"""Where a step's time goes: XLA's operations of one compiled step, by kind.

Builds the same step as `scripts/benchmark.py` (the trainer's train step, or
the evaluation forward pass) for one model, crop and batch, traces a few
calls with the JAX profiler and sums the time of every XLA operation the
CPU (or GPU) threads ran, grouped by kind (`ynn_fusion`: matmuls run by
XNNPACK's YNN library; `copy_bitcast_fusion`/`transpose_copy_fusion`:
layout changes; `conv_general_dilated`: convolutions; `multiply_tanh_fusion`:
the GELU; ...). The times are summed over threads, so they can exceed the
wall time of a step when operations run in parallel. `--by shape` splits
each kind by pass (forward, or backward: the gradient's operations) and
result shape, e.g. the transposes of `[tokens, features]` activations
that the weight gradients read.

  PYTHONPATH=. python scripts/profile_step.py --model ViT-Ti_16 --batch 32 \
      [--work train|inference] [--dtype float32] [--finetune full|ia3|...]
      [--top 15] [--by shape]
"""

import argparse
import collections
import glob
import re
import statistics
import tempfile
import time
from typing import Callable, Dict, List, Tuple

import benchmark
import jax

# TensorFlow (already the input pipeline's dependency) carries the proto of
# the profiler's trace files.
from tensorflow.tsl.profiler.protobuf import xplane_pb2

# Events of the runtime itself, not operations of the step.
RUNTIME_EVENTS = ('ThunkExecutor', 'SlinkyThreadPool', 'end: ')


def op_seconds(
  trace_dir: str, calls: int
) -> Tuple[Dict[str, float], Dict[str, float]]:
  """Seconds per call and runs per call of each XLA operation (by its HLO
  name; an operation of a step mapped over several devices runs once on
  each)."""
  paths = glob.glob(f'{trace_dir}/**/*.xplane.pb', recursive=True)
  if not paths:
    raise FileNotFoundError(f'The profiler wrote no trace under {trace_dir}.')
  space = xplane_pb2.XSpace()
  with open(paths[0], 'rb') as f:
    space.ParseFromString(f.read())
  seconds, runs = collections.Counter(), collections.Counter()
  for plane in space.planes:
    names = {key: meta.name for key, meta in plane.event_metadata.items()}
    for line in plane.lines:
      if line.name == 'python':
        continue
      for event in line.events:
        name = names.get(event.metadata_id, '?')
        if not name.startswith(RUNTIME_EVENTS):
          seconds[name] += event.duration_ps / 1e12 / calls
          runs[name] += 1 / calls
  return dict(seconds), dict(runs)


def kind(name: str) -> str:
  """'copy_bitcast_fusion' for 'copy_bitcast_fusion.66'."""
  return re.sub(r'\.\d+$', '', name)


def describe_ops(hlo_text: str) -> Dict[str, Tuple[str, str]]:
  """{operation name: (pass, result shape)} from a compiled step's HLO:
  'backward' for operations JAX's transpose (the gradient) produced, and
  the operation's shape, e.g. 'f32[768,6304]'."""
  described = {}
  for line in hlo_text.splitlines():
    match = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ', line)
    if not match:
      continue
    op_name = re.search(r'op_name="([^"]*)"', line)
    backward = op_name and 'transpose(jvp' in op_name.group(1)
    shape = match.group(2)
    shape = 'tuple' if shape.startswith('(') else re.sub(r'\{.*', '', shape)
    described.setdefault(
      match.group(1), ('backward' if backward else 'forward', shape)
    )
  return described


def grouped(
  seconds: Dict[str, float],
  runs: Dict[str, float],
  key: Callable[[str], Tuple[str, ...]],
) -> List[Tuple[Tuple[str, ...], float, float]]:
  """(group, seconds per call, runs per call), largest first."""
  totals, counts = collections.Counter(), collections.Counter()
  for name, value in seconds.items():
    totals[key(name)] += value
    counts[key(name)] += runs[name]
  return [
    (group, totals[group], counts[group]) for group, _ in totals.most_common()
  ]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='ViT-Ti_16')
  parser.add_argument('--crop', type=int, default=224)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--work', default='train', choices=benchmark.WORK)
  parser.add_argument(
    '--finetune',
    default='full',
    help="fine-tuning mode preset (scripts/benchmark_finetune.py's modes)",
  )
  parser.add_argument(
    '--calls',
    type=int,
    default=2,
    help='traced calls (after two untraced ones)',
  )
  parser.add_argument('--top', type=int, default=15)
  parser.add_argument(
    '--by',
    default='kind',
    choices=('kind', 'shape'),
    help='group operations by kind, or by kind, pass and result shape',
  )
  args = parser.parse_args()
  config = benchmark.experiment_config(
    args.model, args.crop, args.batch, args.dtype, args.finetune
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
    seconds, runs = op_seconds(trace_dir, args.calls)
  if args.by == 'shape':
    described = describe_ops(workload.hlo_text())
    groups = grouped(
      seconds,
      runs,
      lambda name: (kind(name),) + described.get(name, ('?', '?')),
    )
  else:
    groups = grouped(seconds, runs, lambda name: (kind(name),))
  total = sum(seconds.values())
  print(benchmark.machine())
  print(
    f'{args.work} step of {args.model} ({args.finetune}) at {args.crop}, '
    f'batch {args.batch}, {args.dtype}: {statistics.median(wall):.3f} s wall '
    f'per call (traced), {total:.3f} s of XLA operations summed over '
    'threads'
  )
  print(f'{"operation":<52} {"s/call":>8} {"share":>6} {"ops/call":>8}')
  for group, value, count in groups[: args.top]:
    print(
      f'{" ".join(group):<52} {value:8.3f} {100 * value / total:5.1f}% '
      f'{round(count):8d}'
    )


if __name__ == '__main__':
  main()
