"""Per-device memory and compile time of the train step, from shapes alone.

Each row compiles the trainer's own train step (`experiment.build` with an
abstract state: nothing is initialised or run) under the mesh engine over
--devices devices at --crop px, --batch_per_device images per device,
bfloat16 compute and AdamW, and reads XLA's buffer assignment of one
device (`compiled.memory_analysis()`):

  state      the arguments: params, optimizer state, step (and the batch)
  temporary  what the step allocates besides its arguments and outputs
  total      arguments + temporaries, what one device must hold

It prints four comparisons: the state with FSDP against data parallel
(replicated state); the temporaries with each encoder block
rematerialised against without, scanned and unrolled; the compile time of
a scanned encoder against an unrolled one; and which models fit
--budget_gib per device with FSDP, remat and scan together. Each row
compiles once; compile times are wall-clock, so the machine should be
otherwise idle.

  PYTHONPATH=. python scripts/benchmark_memory.py

On a CPU host the devices are XLA's host-platform devices
(--xla_force_host_platform_device_count, set here before JAX starts).
"""

import argparse
import functools
import os
import platform
import time
from typing import Dict, List

DEVICES_FLAG = '--xla_force_host_platform_device_count'


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--devices', type=int, default=8)
  parser.add_argument('--crop', type=int, default=224)
  parser.add_argument('--batch_per_device', type=int, default=16)
  parser.add_argument('--budget_gib', type=float, default=16.0)
  parser.add_argument(
    '--fsdp_models',
    default='ViT-L_16,ViT-H_14,ViT-g_14',
    help='models whose state is compared with and without FSDP',
  )
  parser.add_argument(
    '--remat_models',
    default='ViT-L_16',
    help='models whose temporaries are compared with and without remat',
  )
  parser.add_argument(
    '--scan_models',
    default='ViT-H_14',
    help='models whose compile time is compared scanned and unrolled',
  )
  parser.add_argument(
    '--fit_models',
    default='ViT-L_16,ViT-H_14,ViT-g_14,ViT-G_14',
    help='models checked against --budget_gib (FSDP, remat and scan)',
  )
  return parser.parse_args()


ARGS = parse_args()
if DEVICES_FLAG not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (
    f'{os.environ.get("XLA_FLAGS", "")} {DEVICES_FLAG}={ARGS.devices}'
  ).strip()

import jax  # noqa: E402  (after XLA_FLAGS)

from configs import common  # noqa: E402
from vit_jax import experiment  # noqa: E402
from vit_jax import models  # noqa: E402

NUM_CLASSES = 1000
GIB = 2**30


def step_config(model: str, fsdp: bool, remat: bool, scan: bool):
  """The ImageNet-sized training settings of a row: AdamW, bfloat16
  compute, one micro-batch, the mesh engine."""
  config = common.with_dataset(common.get_config(), 'cifar10')
  config.model = models.MODEL_CONFIGS[model].copy_and_resolve_references()
  with config.model.unlocked():
    config.model.transformer.remat = remat
    config.model.transformer.scan = scan
  config.pp.crop = ARGS.crop
  config.update(
    {
      'batch': ARGS.batch_per_device * ARGS.devices,
      'accum_steps': 1,
      'dtype': 'bfloat16',
      'optimizer': 'adamw',
      'weight_decay': 1e-4,
      'engine': 'mesh',
      'fsdp': fsdp,
    }
  )
  return config


@functools.lru_cache(maxsize=None)
def measure(model: str, fsdp: bool, remat: bool, scan: bool) -> Dict:
  """Compiles the row's train step from shapes; its memory per device (in
  bytes) and compile time (lowering + XLA, seconds). Each row compiles
  once, whichever comparisons it appears in."""
  config = step_config(model, fsdp, remat, scan)
  exp = experiment.build(config, NUM_CLASSES, abstract=True)
  engine = exp.engine
  state = engine.restore_target(exp.state)
  batch = engine.abstract_batch(
    {
      'image': jax.ShapeDtypeStruct(
        (config.batch, ARGS.crop, ARGS.crop, 3), 'float32'
      ),
      'label': jax.ShapeDtypeStruct((config.batch,), 'int32'),
    }
  )
  start = time.perf_counter()
  compiled = engine.train_step(exp.train_step).lower(state, batch).compile()
  seconds = time.perf_counter() - start
  stats = compiled.memory_analysis()
  row = {
    'model': model,
    'fsdp': fsdp,
    'remat': remat,
    'scan': scan,
    'state': stats.argument_size_in_bytes,
    'temporary': stats.temp_size_in_bytes,
    'total': stats.argument_size_in_bytes + stats.temp_size_in_bytes,
    'compile_s': seconds,
  }
  print(
    f'{model} fsdp={fsdp} remat={remat} scan={scan}: state '
    f'{row["state"] / GIB:.2f} GiB, temporary {row["temporary"] / GIB:.2f} '
    f'GiB, compiled in {seconds:.1f} s',
    flush=True,
  )
  return row


def compared(
  figure: str,
  unit: float,
  spec: str,
  model: str,
  fsdp=True,
  remat=True,
  scan=True,
) -> List[str]:
  """`figure` of `model` in two rows that differ in the one option given
  as a pair (before, after): both values in `unit`, and after / before."""
  options = {'fsdp': fsdp, 'remat': remat, 'scan': scan}
  varied = next(k for k, v in options.items() if isinstance(v, tuple))
  rows = [
    measure(model, **{**options, varied: value}) for value in options[varied]
  ]
  before, after = (row[figure] for row in rows)
  return [
    f'{before / unit:{spec}}',
    f'{after / unit:{spec}}',
    f'{after / before:.3f}',
  ]


def table(header: List[str], lines: List[List[str]]) -> str:
  """A Markdown table."""
  rows = [header, ['---'] * len(header)] + lines
  return '\n'.join('| ' + ' | '.join(row) + ' |' for row in rows)


def cpu_model() -> str:
  """The host CPU's model name."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def main() -> None:
  print(
    f'JAX {jax.__version__}, {jax.device_count()} x '
    f'{jax.devices()[0].device_kind}; host CPU {cpu_model()}; train step at '
    f'{ARGS.crop} px, {ARGS.batch_per_device} images per device, bfloat16, '
    'AdamW, mesh engine'
  )
  split = lambda names: [n for n in names.split(',') if n]  # noqa: E731
  fsdp_lines = [
    [model, *compared('state', GIB, '.2f', model, fsdp=(False, True))]
    for model in split(ARGS.fsdp_models)
  ]
  remat_lines = [
    [
      model,
      'scanned' if scan else 'unrolled',
      *compared(
        'temporary',
        GIB,
        '.2f',
        model,
        fsdp=False,
        remat=(False, True),
        scan=scan,
      ),
    ]
    for model in split(ARGS.remat_models)
    for scan in (True, False)
  ]
  scan_lines = [
    [
      model,
      *compared('compile_s', 1, '.1f', model, fsdp=False, scan=(False, True)),
    ]
    for model in split(ARGS.scan_models)
  ]
  fit_lines = []
  for model in split(ARGS.fit_models):
    row = measure(model, fsdp=True, remat=True, scan=True)
    fits = row['total'] <= ARGS.budget_gib * GIB
    fit_lines.append(
      [
        model,
        f'{row["state"] / GIB:.2f}',
        f'{row["temporary"] / GIB:.2f}',
        f'{row["total"] / GIB:.2f}',
        'yes' if fits else 'no',
      ]
    )
  print()
  print(
    table(
      ['model', 'state, data parallel (GiB)', 'state, FSDP (GiB)', 'ratio'],
      fsdp_lines,
    )
  )
  print()
  print(
    table(
      [
        'model',
        'blocks',
        'temporary, no remat (GiB)',
        'temporary, remat (GiB)',
        'ratio',
      ],
      remat_lines,
    )
  )
  print()
  print(
    table(
      ['model', 'compile, unrolled (s)', 'compile, scan (s)', 'ratio'],
      scan_lines,
    )
  )
  print()
  print(
    table(
      [
        'model',
        'state (GiB)',
        'temporary (GiB)',
        'total (GiB)',
        f'fits {ARGS.budget_gib:g} GiB',
      ],
      fit_lines,
    )
  )


if __name__ == '__main__':
  main()
