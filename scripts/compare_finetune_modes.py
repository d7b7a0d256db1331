"""Fine-tune one upstream checkpoint with every mode and tabulate the results.

1. Upstream: trains `configs/scratch.py:UPSTREAM` (default mnist5k, with
   learned position embeddings so that a new resolution resizes them) and
   exports its parameters to `OUT/upstream.npz`, unless `--upstream` gives a
   checkpoint file (any format `vit_jax.checkpoint` reads).
2. Learning rate: each fine-tuning preset (`vit_jax.finetune.modes.presets`:
   full, head, head with an MLP head, one row per injection method) is
   trained with each rate of `--full_lrs` (full) or `--frozen_lrs` (the
   others) on the first 80% of DOWNSTREAM's train split and scored on the
   other 20%, in `OUT/lr_sweep/<row>_<lr>/`; the best rate is the row's.
3. Downstream: each row is trained with its rate on the whole train split
   at `--crop` and scored on the test split, in `OUT/<row>_<lr>/`.
4. Serving: reads the upstream checkpoint once and evaluates every run's task
   file on it (`vit_jax.finetune.serving`), a check that the small files
   reproduce the trained models.

Writes `OUT/results.md` (the table) and `OUT/results.json`. Runs that
finished in an earlier invocation with the same OUT are not trained again.

  PYTHONPATH=. python scripts/compare_finetune_modes.py --out=/tmp/ft_compare

The real case (ViT-B/16 from ImageNet-21k on CIFAR-10, as vit_jax's README)
is the same command with `--upstream=ViT-B_16.npz --config=b16,cifar10` (an
argument of `configs/vit.py`).
"""

import argparse
import os
import time
from typing import Any, Dict, List

from absl import logging
import jax
import ml_collections
import numpy as np
import runs as runs_lib

from configs import scratch
from configs import vit as vit_configs
from vit_jax import checkpoint
from vit_jax import input_pipeline
from vit_jax import paths
from vit_jax import results as results_lib
from vit_jax import train
from vit_jax.checkpoint import task_file
from vit_jax.finetune import modes
from vit_jax.finetune import serving

UPSTREAM_FILE = 'upstream.npz'
ROWS = modes.presets()
# Held-out slice of the lr sweep (tfds split syntax): never the test split.
SWEEP_SPLITS = {'pp.train': 'train[:80%]', 'pp.test': 'train[80%:]'}


def upstream_checkpoint(args, out: str) -> str:
  """Trains the upstream model from scratch and exports it to an .npz."""
  config = scratch.get_config(args.upstream_dataset)
  config.model.posemb = 'learned'
  workdir = os.path.join(out, 'upstream')
  results = train.train_and_evaluate(config, workdir)
  params = task_file.load_task_params(
    results_lib.task_file_path(workdir, results), base_params={}
  )
  path = os.path.join(out, UPSTREAM_FILE)
  checkpoint.save(path, params)
  logging.info(
    'Upstream: %.4f test accuracy on %s, exported to %s',
    results['test_accuracy'],
    args.upstream_dataset,
    path,
  )
  return path


def downstream_config(
  args, upstream: str, row: str, base_lr: float
) -> ml_collections.ConfigDict:
  """The downstream run of `row` at `base_lr`, starting from `upstream`."""
  if args.config:
    config = vit_configs.get_config(args.config)
  else:
    config = scratch.get_config(args.downstream)
    config.model = scratch.get_config(args.upstream_dataset).model
    config.model.posemb = 'learned'
    config.pp.update({'crop': args.crop, 'pad': 2})
    config.total_steps = args.steps
  config.base_lr = base_lr
  config.pretrained_path = upstream
  config.finetune.update(ROWS[row])  # Merges the nested keys.
  return config


def swept_learning_rate(args, upstream: str, row: str) -> Dict[str, Any]:
  """The rate of `row` with the best held-out accuracy (the lower rate on a
  tie), and every rate's held-out accuracy."""
  rates = args.full_lrs if row == 'full' else args.frozen_lrs
  held_out = {}
  for lr in rates:
    config = downstream_config(args, upstream, row, lr)
    config.update_from_flattened_dict(SWEEP_SPLITS)
    config.checkpoint_every = config.total_steps
    workdir = os.path.join(args.out, 'lr_sweep', f'{row}_{lr:g}')
    results = runs_lib.finished_or_trained(config, workdir)
    held_out[lr] = results['test_accuracy']
  best = max(sorted(held_out), key=lambda lr: held_out[lr])
  return {'base_lr': best, 'held_out': held_out}


def serve_accuracy(upstream: str, runs: Dict[str, Any]) -> Dict[str, float]:
  """Test accuracy of each task file applied to one shared upstream read."""
  tasks = serving.load_tasks(
    upstream,
    [
      results_lib.task_file_path(run['workdir'], run['results'])
      for run in runs.values()
    ],
  )
  accuracy = {}
  for (row, run), task in zip(runs.items(), tasks.values()):
    config = run['config']
    source = input_pipeline.get_source(
      config.dataset,
      tfds_data_dir=config.tfds_data_dir,
      tfds_manual_dir=config.tfds_manual_dir,
    )
    data = input_pipeline.eval_dataset(
      source,
      config.pp,
      batch_size=config.batch_eval,
      hosts=input_pipeline.Hosts(0, 1, 1),
    )
    correct = 0
    for batch in data.dataset.as_numpy_iterator():
      logits = np.asarray(task.logits(batch['image'][0]))
      correct += int(
        ((logits.argmax(-1) == batch['label'][0]) & batch['mask'][0]).sum()
      )
    accuracy[row] = correct / data.num_examples
  return accuracy


def table(rows: List[Dict[str, Any]]) -> str:
  """The markdown results table."""
  lines = [
    '| mode | method | learning rate (held-out accuracy) | trainable params '
    '| % of total | test accuracy | from task file | train time | step time '
    '| saved file |',
    '|---|---|---|---:|---:|---:|---:|---:|---:|---:|',
  ]
  for r in rows:
    swept = (
      ', '.join(
        f'**{lr:g}**' if lr == r['base_lr'] else f'{lr:g}'
        for lr in r['held_out']
      )
      + ' ('
      + ', '.join(f'{100 * acc:.1f}%' for acc in r['held_out'].values())
      + ')'
    )
    lines.append(
      f'| {r["mode"]} | {r["method"]} | {swept} | {r["trainable_params"]:,} | '
      f'{100 * r["trainable_params"] / r["total_params"]:.2f}% | '
      f'{100 * r["test_accuracy"]:.1f}% | {100 * r["served_accuracy"]:.1f}% '
      f'| {r["wall_time_s"]:.0f} s | {1000 * r["step_time_s"]:.0f} ms | '
      f'{r["task_file_bytes"] / 1024:,.0f} KiB |'
    )
  return '\n'.join(lines)


def _rates(text: str) -> List[float]:
  """'1e-3,3e-3' -> [0.001, 0.003]."""
  return [float(x) for x in text.split(',')]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True)
  parser.add_argument(
    '--upstream',
    help='a checkpoint file; default: train '
    'configs/scratch.py:UPSTREAM_DATASET',
  )
  parser.add_argument('--upstream_dataset', default='mnist5k')
  parser.add_argument('--downstream', default='digits')
  parser.add_argument(
    '--crop',
    type=int,
    default=21,
    help='downstream resolution (upstream mnist5k: 28)',
  )
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument(
    '--full_lrs',
    type=_rates,
    default='3e-4,1e-3,3e-3,1e-2',
    help='learning rates swept for full fine-tuning (one: no sweep)',
  )
  parser.add_argument(
    '--frozen_lrs',
    type=_rates,
    default='3e-3,1e-2,3e-2,1e-1,3e-1',
    help='learning rates swept for the modes with a frozen encoder',
  )
  parser.add_argument(
    '--config',
    help='a configs/vit.py argument (e.g. '
    'b16,cifar10) for the real case instead of the small '
    'downstream setup',
  )
  parser.add_argument('--rows', default=','.join(ROWS))
  args = parser.parse_args()
  logging.set_verbosity(logging.INFO)
  os.makedirs(args.out, exist_ok=True)
  start = time.perf_counter()
  exported = os.path.join(args.out, UPSTREAM_FILE)
  upstream = args.upstream or (
    exported
    if os.path.exists(exported)
    else upstream_checkpoint(args, args.out)
  )
  runs = {}
  for row in args.rows.split(','):
    sweep = swept_learning_rate(args, upstream, row)
    config = downstream_config(args, upstream, row, sweep['base_lr'])
    workdir = os.path.join(args.out, f'{row}_{sweep["base_lr"]:g}')
    runs[row] = {
      'sweep': sweep,
      'config': config,
      'workdir': workdir,
      'results': runs_lib.finished_or_trained(config, workdir),
    }
  served = serve_accuracy(upstream, runs)
  rows = []
  for row, run in runs.items():
    fine = run['config'].finetune
    r = run['results']
    rows.append(
      {
        'row': row,
        'mode': (
          fine.mode
          if fine.head.type == 'linear'
          else f'{fine.mode} ({fine.head.type})'
        ),
        'method': (fine.injection.method if fine.mode == 'injection' else '-'),
        'served_accuracy': served[row],
        'base_lr': run['config'].base_lr,
        'held_out': run['sweep']['held_out'],
        **{
          k: r[k]
          for k in (
            'trainable_params',
            'total_params',
            'test_accuracy',
            'wall_time_s',
            'step_time_s',
            'task_file_bytes',
          )
        },
      }
    )
  text = table(rows)
  print(text)
  paths.write_text(os.path.join(args.out, 'results.md'), text + '\n')
  paths.write_json(
    os.path.join(args.out, 'results.json'),
    {
      'rows': rows,
      'upstream': upstream,
      'device': jax.devices()[0].device_kind,
      'total_time_s': time.perf_counter() - start,
    },
  )


if __name__ == '__main__':
  main()
