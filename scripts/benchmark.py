"""Inference and training throughput of ViTs, against this machine's matmul peak.

For every combination of --models, --crops, --batches, --dtypes and
--model_options and each
kind of --work (`inference`: the evaluation forward pass; `train`: the
trainer's own step with SGD momentum, clipping and the fine-tuning mode of
--finetune), builds the compiled step on all local devices, warms it up, then
times all of them in alternation (A B C A B C ...) and prints, per row, the
median seconds per batch (each timed call right after an untimed one of
the same row), images/s and images/s per device, the FLOP/s
achieved (XLA's count of the step) as a fraction of the best square-matmul
FLOP/s measured in the same run for that dtype, and XLA's memory per device.

  PYTHONPATH=. python scripts/benchmark.py --models ViT-Ti_16,ViT-B_16 \
      --batches 8,32 --work inference,train [--dtypes float32,bfloat16]

`--model_options ";approximate_gelu=False"` times variants of each model
(model options changed; "" = as registered) side by side.

`--devices 1,2` times each row on 1 and on 2 devices side by side (data
parallel, the batch split between them); on a CPU host, JAX then gets 2
devices, as with the trainer's `config.cpu_devices=2`. Without it, every
row runs on all local devices.

`--engines pmap,mesh` times the train step under each engine
(`config.engine`: `jax.pmap`, or `jax.jit` over a mesh of the devices)
side by side; the inference rows always use pmap.

`--compare timm` adds, for every row, the same work done by timm
(PyTorch; `scripts/timm_reference.py`, `pip install -e '.[bench]'`) on the
same weights and images, bfloat16 rows under `torch.autocast('cpu',
torch.bfloat16)`, timed in the same alternation; it prints the
largest logit difference between the two models and, per row, the ratio of
our images/s to timm's.

Weights are random (speed does not depend on them); TensorFlow is not
imported, so this runs wherever JAX, Flax, optax and ml_collections are.
"""

import argparse
import ast
import importlib
import itertools
import os
import platform
import resource
import statistics
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp

from configs import common
from vit_jax import cpu_devices
from vit_jax import models
from vit_jax.benchmarks import timing
from vit_jax.checkpoint import pretrained
from vit_jax.finetune import modes

NUM_CLASSES = 1000
WORK = ('inference', 'train')


def parse_options(text: str) -> Dict[str, Any]:
  """'approximate_gelu=False,dropout_rate=0.1' → {'approximate_gelu': False,
  ...}."""
  options = {}
  for item in filter(None, text.split(',')):
    name, sep, value = item.partition('=')
    if not sep:
      raise ValueError(f'--model_options item {item!r}: write name=value.')
    options[name.strip()] = ast.literal_eval(value.strip())
  return options


def experiment_config(
  model: str,
  crop: int,
  batch: int,
  dtype: str = 'float32',
  finetune: str = 'full',
  options: Optional[Dict[str, Any]] = None,
):
  """configs/common.py's CIFAR-10 fine-tuning settings for `model` at `crop`,
  one step of `batch`, fine-tuning preset `finetune` (`modes.presets()`),
  with model `options` (e.g. approximate_gelu) changed."""
  config = common.with_dataset(common.get_config(), 'cifar10')
  config.model = models.MODEL_CONFIGS[model].copy_and_resolve_references()
  with config.model.unlocked():
    config.model.update(options or {})
  # Float32 momentum: the update timm's SGD makes (the trainer's default
  # bfloat16 momentum would make our step do different work).
  config.update(
    {
      'batch': batch,
      'batch_eval': batch,
      'accum_steps': 1,
      'dtype': dtype,
      'optim_dtype': 'float32',
    }
  )
  config.pp.crop = crop
  config.finetune.update(modes.presets()[finetune])
  return config


def make_workload(
  work: str, config, devices: Optional[List[jax.Device]] = None
) -> timing.Workload:
  """The compiled step of `work` for `config` on `devices` (default: all
  local devices)."""
  if work == 'train':
    return timing.train_workload(config, NUM_CLASSES, devices)
  model, params = initial_model(config)
  return timing.forward_workload(
    model, params, config.batch_eval, config.pp.crop, devices
  )


def initial_model(config) -> Tuple[Any, Any]:
  """The model of `config` and the parameters its runs start from (the
  train step's initial parameters too: same seed)."""
  model = models.build_model(
    config.model, num_classes=NUM_CLASSES, dtype=jnp.dtype(config.dtype)
  )
  return model, pretrained.init_params(model, config.pp.crop, seed=config.seed)


def reference_run(
  reference, work: str, config, images, labels
) -> Tuple[Callable[[], None], float]:
  """timm's call doing `work` of `config` on our weights and batch (under
  `torch.autocast` to bfloat16 where `config.dtype` is bfloat16), and the
  largest |our logit - timm's float32 logit| on the first 4 images (the
  head gets random weights for that check: its initial zeros would make
  every logit 0)."""
  model, params = initial_model(config)
  head = params['head']['kernel']
  params = dict(
    params,
    head=dict(
      params['head'],
      kernel=jax.random.normal(jax.random.key(1), head.shape) * 0.02,
    ),
  )
  net = reference.build(
    config.model.model_name,
    params,
    config.pp.crop,
    NUM_CLASSES,
    model.approximate_gelu,
  )
  ours = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))(
    params, images[:4]
  )
  difference = float(
    abs(jax.device_get(ours) - reference.logits(net, images[:4])).max()
  )
  autocast = config.dtype == 'bfloat16'
  if work == 'train':
    run = reference.train_run(
      net, images, labels, config.base_lr, config.grad_norm_clip, autocast
    )
  else:
    run = reference.forward_run(net, images, autocast)
  return run, difference


def machine() -> str:
  """One line naming the machine the figures come from."""
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(
        line.split(':', 1)[1].strip()
        for line in f
        if line.startswith('model name')
      )
  except (OSError, StopIteration):
    pass
  device = jax.local_devices()[0]
  return (
    f'JAX {jax.__version__}, {jax.local_device_count()} x '
    f'{device.device_kind} ({device.platform}); host CPU {cpu}, '
    f'{os.cpu_count()} logical cores'
  )


def format_rows(rows: List[Dict], peaks: Dict[str, Dict[str, float]]) -> str:
  """The results as a Markdown table; a timm row follows the row it copies
  and shows our images/s over its own."""
  lines = [
    '| work | model | code | crop | batch | dtype | GFLOP/img | s/batch '
    '| devices | img/s | img/s/device | GFLOP/s | % of matmul peak '
    '| XLA MB/device | vit_jax / timm |',
    '|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
  ]
  # CPU devices share the host's cores, whose peak was measured on one.
  shared_peak = jax.local_devices()[0].platform == 'cpu'
  ours = {}
  for row in rows:
    devices = row['devices']
    sharing = 1 if shared_peak else devices
    workload, seconds = row['workload'], row['seconds']
    achieved = workload.flops / seconds
    timm_row = row['code'] == 'timm'
    if not timm_row:
      ours[row['key']] = seconds
    memory = '' if timm_row else f'{workload.memory_bytes / 2**20:.0f}'
    ratio = f'{seconds / ours[row["key"]]:.2f}' if timm_row else ''
    lines.append(
      f'| {row["work"]} | {row["model"]} | {row["code"]} | {row["crop"]} '
      f'| {row["batch"]} | {row["dtype"]} '
      f'| {workload.flops / workload.images / 1e9:.2f} '
      f'| {seconds:.3f} | {devices} | {workload.images / seconds:.1f} '
      f'| {workload.images / seconds / devices:.1f} '
      f'| {achieved / 1e9:.1f} '
      f'| {100 * achieved / sharing / peaks[row["dtype"]]["flops_per_s"]:.0f}%'
      f' | {memory} | {ratio} |'
    )
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default='ViT-Ti_16,ViT-B_16')
  parser.add_argument('--crops', default='224')
  parser.add_argument('--batches', default='8')
  parser.add_argument('--dtypes', default='float32')
  parser.add_argument('--work', default='inference,train')
  parser.add_argument(
    '--devices',
    default='',
    help='comma-separated device counts to time each row on (the first N '
    'local devices; a CPU host gets the largest count; default: all local '
    'devices)',
  )
  parser.add_argument(
    '--engines',
    default='pmap',
    help='comma-separated engines of the train rows (config.engine: pmap, '
    'mesh), timed side by side',
  )
  parser.add_argument(
    '--finetune',
    default='full',
    choices=sorted(modes.presets()),
    help='what the train step updates (a fine-tuning preset)',
  )
  parser.add_argument(
    '--model_options',
    default='',
    help='variants of the models to time side by side, '
    'separated by ";", each comma-separated name=value '
    'model options ("" = as registered), e.g. '
    '";approximate_gelu=False"',
  )
  parser.add_argument(
    '--compare',
    default='',
    choices=('', 'timm'),
    help='also time timm on the same weights (full fine-tuning)',
  )
  parser.add_argument(
    '--rounds',
    type=int,
    default=5,
    help='timed calls per row, alternating rows (median)',
  )
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument(
    '--settle',
    type=int,
    default=1,
    help='untimed calls of a row right before each timed '
    'one (so it is not timed in the wake of another row)',
  )
  args = parser.parse_args()
  for work in args.work.split(','):
    if work not in WORK:
      parser.error(f'--work={work!r}; choose from {WORK}.')
  if args.compare and args.finetune != 'full':
    parser.error('--compare timm times full fine-tuning only.')
  counts = [int(n) for n in args.devices.split(',') if n]
  if counts and not cpu_devices.user_chose_count():
    # A CPU host gets the devices asked for (`config.cpu_devices`).
    cpu_devices.set_count(max(counts))
  # Imported only here: torch and timm are an optional extra.
  reference = (
    importlib.import_module('timm_reference') if args.compare else None
  )
  print(machine())
  if reference:
    print(
      'Reference: '
      + ', '.join(f'{k} {v}' for k, v in reference.describe().items())
    )
  peaks = {}
  for dtype in args.dtypes.split(','):
    peaks[dtype] = timing.matmul_peak(jnp.dtype(dtype))
    print(
      f'{dtype} matmul peak per device (JAX): '
      f'{peaks[dtype]["flops_per_s"] / 1e9:.1f} GFLOP/s '
      f'({peaks[dtype]["size"]}x{peaks[dtype]["size"]} matrices)'
    )
  for dtype in peaks if reference else ():
    # The machine's peak is the better of the two libraries' matmuls.
    torch_peak = reference.matmul_peak(timing.PEAK_SIZES, dtype=dtype)
    print(
      f'{dtype} matmul peak (PyTorch): '
      f'{torch_peak["flops_per_s"] / 1e9:.1f} GFLOP/s '
      f'({torch_peak["size"]}x{torch_peak["size"]} matrices)'
    )
    peaks[dtype] = max(
      peaks[dtype], torch_peak, key=lambda peak: peak['flops_per_s']
    )
  local = jax.local_devices()
  counts = counts or [len(local)]
  if max(counts) > len(local) or min(counts) < 1:
    parser.error(
      f'--devices={args.devices}: this process has {len(local)} local '
      'devices; give counts from 1 to that.'
    )
  grid = itertools.product(
    args.work.split(','),
    args.models.split(','),
    map(int, args.crops.split(',')),
    map(int, args.batches.split(',')),
    args.dtypes.split(','),
    args.model_options.split(';'),
    counts,
    args.engines.split(','),
  )
  engines = args.engines.split(',')
  rows, runs = [], {}
  for work, model, crop, batch, dtype, options, count, engine in grid:
    train_engine = work == 'train' and len(engines) > 1
    if work == 'inference' and engine != engines[0]:
      continue  # Inference is pmap's forward pass, timed once.
    key: Tuple = (work, model, crop, batch, dtype, options, count, engine)
    config = experiment_config(
      model, crop, batch, dtype, args.finetune, parse_options(options)
    )
    config.engine = engine
    workload = make_workload(work, config, local[:count])
    row = dict(
      zip(('work', 'model', 'crop', 'batch', 'dtype'), key),
      key=key,
      devices=count,
      code=' '.join(
        filter(None, ['vit_jax', options, train_engine and f'engine={engine}'])
      ),
      workload=workload,
    )
    rows.append(row)
    runs[key] = workload.run
    if reference and not options and count == counts[-1] and engine == 'pmap':
      data = jax.device_get(
        timing.synthetic_batch(batch, crop, NUM_CLASSES, local[:count])
      )
      images = data['image'].reshape(batch, crop, crop, 3)
      run, difference = reference_run(
        reference, work, config, images, data['label'].reshape(batch)
      )
      print(
        f'{work} {model} at {crop}: max |logit difference| vit_jax vs '
        f'timm = {difference:.2e}'
      )
      rows.append(dict(row, code='timm', devices=1))
      runs[key + ('timm',)] = run
  seconds = timing.time_rounds(runs, args.rounds, args.warmup, args.settle)
  for row, key in zip(rows, runs):
    row['seconds'] = statistics.median(seconds[key])
  print(
    f'Median of {args.rounds} alternating rounds after {args.warmup} '
    f'warm-up calls, {args.settle} untimed call(s) before each timed one; '
    f"train = the trainer's step (finetune {args.finetune}, SGD "
    'momentum, clipping).'
  )
  print(format_rows(rows, peaks))
  print(
    f'Peak resident memory of this process: '
    f'{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MB'
  )


if __name__ == '__main__':
  main()
