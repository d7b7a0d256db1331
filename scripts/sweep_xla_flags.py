"""XLA CPU flags, each measured alone against timm in its own process.

XLA reads `XLA_FLAGS` once, when JAX initialises, so every setting runs
`scripts/benchmark.py --compare timm` in a fresh process with that setting
added to the environment's `XLA_FLAGS`; timm runs in the same process,
alternating with ours, so each ratio is measured side by side. Prints and
writes `OUT/results.md` (setting, flags, work, dtype, our seconds per
batch, vit_jax / timm and JAX's square-matmul peak, per setting) and
`OUT/results.json`. With `--dtypes=bfloat16`, timm runs under
`torch.autocast`.

  PYTHONPATH=. python scripts/sweep_xla_flags.py --out=/tmp/xla_flags
  PYTHONPATH=. python scripts/sweep_xla_flags.py --out=/tmp/xla_flags \
      --settings=default,ynn_off --models=ViT-B_16 --batches=8

Needs torch and timm (`pip install -r requirements-bench.txt`).
"""

import argparse
import os
import re
import subprocess
import sys
from typing import Dict, List

from vit_jax import paths

# name: the flags it adds. Each is one lever of docs/benchmarks.md, alone.
SETTINGS: Dict[str, str] = {
  'default': '',
  'ynn_off': '--xla_cpu_experimental_ynn_fusion_type=',
  'onednn': '--xla_cpu_use_onednn=true',
  'xnnpack_off': '--xla_cpu_use_xnnpack=false',
  'fast_math': '--xla_cpu_enable_fast_math=true',
  'vector_width_512': '--xla_cpu_prefer_vector_width=512',
  'concurrency_scheduler': (
    '--xla_cpu_enable_concurrency_optimized_scheduler=true'
  ),
  'two_devices': '--xla_force_host_platform_device_count=2',
  'two_devices_ynn_off': (
    '--xla_force_host_platform_device_count=2 '
    '--xla_cpu_experimental_ynn_fusion_type='
  ),
  'two_devices_eigen_single': (
    '--xla_force_host_platform_device_count=2 '
    '--xla_cpu_multi_thread_eigen=false'
  ),
  'ynn_individual_dot': '--xla_cpu_experimental_ynn_fusion_type=individual_dot',
  'onednn_custom_call': (
    '--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true '
    '--xla_cpu_experimental_ynn_fusion_type='
  ),
}
BENCHMARK = os.path.join(
  os.path.dirname(os.path.abspath(__file__)), 'benchmark.py'
)


def timm_rows(output: str) -> List[Dict[str, object]]:
  """The rows of benchmark.py's table with our seconds and the ratio: one
  per work and dtype, from the timm row that follows ours, with the JAX
  matmul peak that benchmark.py measured for the dtype."""
  peaks = dict(
    re.findall(r'^(\w+) matmul peak per device \(JAX\): ([\d.]+)', output, re.M)
  )
  rows, ours = [], {}
  for line in output.splitlines():
    cells = [c.strip() for c in line.strip().strip('|').split('|')]
    if len(cells) != 15 or cells[0] in ('work', '---'):
      continue
    work, model, code, dtype = cells[0], cells[1], cells[2], cells[5]
    if code == 'timm':
      rows.append(
        {
          'work': work,
          'model': model,
          'batch': cells[4],
          'dtype': dtype,
          'seconds': ours[(work, model, dtype)],
          'vit_jax_over_timm': float(cells[14]),
          'jax_matmul_peak_gflops': float(peaks.get(dtype, 'nan')),
        }
      )
    else:
      ours[(work, model, dtype)] = float(cells[7])
  return rows


def run_setting(name: str, args: argparse.Namespace) -> Dict[str, object]:
  """One process of benchmark.py with the setting's flags; its rows."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = ' '.join(
    filter(None, [env.get('XLA_FLAGS', ''), SETTINGS[name]])
  )
  command = [
    sys.executable,
    BENCHMARK,
    f'--models={args.models}',
    f'--batches={args.batches}',
    f'--dtypes={args.dtypes}',
    '--work=inference,train',
    '--compare=timm',
  ]
  done = subprocess.run(
    command, env=env, capture_output=True, text=True, check=False
  )
  if done.returncode:
    raise SystemExit(
      f'setting {name!r} ({SETTINGS[name] or "no flags"}) failed:\n'
      + done.stderr[-2000:]
    )
  rows = timm_rows(done.stdout)
  if not rows:
    raise SystemExit(
      f'setting {name!r}: no timm rows in the output of {BENCHMARK} (has '
      'its table changed?):\n' + done.stdout[-2000:]
    )
  return {
    'setting': name,
    'flags': SETTINGS[name],
    'machine': done.stdout.splitlines()[0],
    'rows': rows,
  }


def results_table(results: List[Dict[str, object]]) -> str:
  """One line per setting, work and dtype."""
  lines = [
    '| setting | XLA_FLAGS added | work | model | batch | dtype '
    '| vit_jax s/batch | vit_jax / timm | JAX matmul peak, GFLOP/s |',
    '|---|---|---|---|---:|---|---:|---:|---:|',
  ]
  for result in results:
    for row in result['rows']:
      flags = f'`{result["flags"]}`' if result['flags'] else '(none)'
      lines.append(
        f'| {result["setting"]} | {flags} | {row["work"]} | {row["model"]} '
        f'| {row["batch"]} | {row["dtype"]} | {row["seconds"]} | '
        f'{row["vit_jax_over_timm"]:.2f} | '
        f'{row["jax_matmul_peak_gflops"]:.0f} |'
      )
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True)
  parser.add_argument('--settings', default=','.join(SETTINGS))
  parser.add_argument('--models', default='ViT-Ti_16')
  parser.add_argument('--batches', default='32')
  parser.add_argument(
    '--dtypes',
    default='float32',
    help='float32 and/or bfloat16 (timm then runs under torch.autocast)',
  )
  args = parser.parse_args()
  names = args.settings.split(',')
  unknown = sorted(set(names) - set(SETTINGS))
  if unknown:
    parser.error(f'unknown settings {unknown}; choose from {list(SETTINGS)}')
  os.makedirs(args.out, exist_ok=True)
  results = []
  for name in names:
    results.append(run_setting(name, args))
    text = results[0]['machine'] + '\n\n' + results_table(results)
    paths.write_text(os.path.join(args.out, 'results.md'), text + '\n')
    paths.write_json(os.path.join(args.out, 'results.json'), results)
    print(f'{name}: done', flush=True)
  print(text)


if __name__ == '__main__':
  main()
