"""Train several architectures on one dataset with one budget; tabulate them.

Each model is trained from scratch by the project's training job with
`configs/scratch.py:DATASET,MODEL`: the same data, augmentation, optimizer,
schedule, batch and number of steps for all, so the table compares the
architectures and nothing else. Rows: model, parameters, GFLOPs per image
(XLA's count of the forward pass), training time, median step time and test
accuracy. Writes `OUT/results.md` and `OUT/results.json`; runs that finished
in an earlier invocation with the same OUT are not trained again.

  PYTHONPATH=. python scripts/compare_architectures.py --out=/tmp/arch_compare
  PYTHONPATH=. python scripts/compare_architectures.py --out=/tmp/arch \
      --dataset=digits --models=micro4,resnet_micro --steps=300
"""

import argparse
import os
from typing import Any, Dict, List

import runs

from configs import scratch
from vit_jax import models
from vit_jax.models import table

NUM_CLASSES = 10  # Both datasets of configs/scratch.py are digits.


def train(dataset: str, model: str, steps: int, out: str) -> Dict[str, Any]:
  """One row: trains `model` (a registry short name) unless it finished."""
  config = scratch.get_config(f'{dataset},{model}')
  if steps:
    config.total_steps = steps
  workdir = os.path.join(out, model)
  results = runs.finished_or_trained(config, workdir)
  name = config.model.model_name
  net = models.build_model(config.model, num_classes=NUM_CLASSES)
  variables = table.abstract_variables(net, config.pp.crop)
  return {
    'model': name,
    'params': table.count_params(variables['params']),
    'gflops': table.forward_flops(net, variables, config.pp.crop) / 1e9,
    'crop': config.pp.crop,
    'steps': results['steps'],
    'wall_time_s': results['wall_time_s'],
    'step_time_s': results['step_time_s'],
    'test_accuracy': results['test_accuracy'],
  }


def results_table(rows: List[Dict[str, Any]]) -> str:
  """The Markdown table of the rows."""
  lines = [
    '| model | parameters | GFLOPs / image | steps | train time '
    '| step time | test accuracy |',
    '|---|---:|---:|---:|---:|---:|---:|',
  ]
  for r in rows:
    lines.append(
      f'| {r["model"]} | {r["params"]:,} | {r["gflops"]:.3f} | {r["steps"]} '
      f'| {r["wall_time_s"] / 60:.1f} min | {1000 * r["step_time_s"]:.0f} ms '
      f'| {100 * r["test_accuracy"]:.1f}% |'
    )
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True)
  parser.add_argument(
    '--dataset', default='mnist5k', choices=sorted(scratch.SETUPS)
  )
  parser.add_argument(
    '--models',
    default='mini_c3,swin_mini2_w56,resnet_mini_222',
    help='registry short names (vit_jax/models/registry.py)',
  )
  parser.add_argument(
    '--steps',
    type=int,
    default=0,
    help="training steps (default: the dataset's in configs/scratch.py)",
  )
  args = parser.parse_args()
  rows = [
    train(args.dataset, model, args.steps, args.out)
    for model in args.models.split(',')
  ]
  text = results_table(rows)
  runs.write_table(args.out, text, rows)
  print(text)


if __name__ == '__main__':
  main()
