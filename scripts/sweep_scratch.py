"""The sweep behind `configs/scratch.py:mnist5k`: candidates scored on a
held-out slice of the training split, never on the test split.

Each trial is the recipe before the sweep (`BEFORE`, applied on
`configs/scratch.py:mnist5k`) with a few keys changed, trained
by the project's training job on 350 training images of each digit and
evaluated once, at the end, on the other 50 of each (500 held-out
images). Prints and writes `OUT/results.md` (trial, changes, held-out
accuracy and loss, wall time of training and evaluation) and
`OUT/results.json`; trials that finished in an earlier invocation with the
same OUT are not trained again.

  PYTHONPATH=. python scripts/sweep_scratch.py --out=/tmp/sweep --round=1
  PYTHONPATH=. python scripts/sweep_scratch.py --out=/tmp/sweep --trials=before,affine_mlp256_2000
"""

import argparse
import os
from typing import Any, Dict, List

import runs

from configs import scratch

# mnist5k's train split holds 400 images of each digit in turn; the last 50
# of each digit are held out, 500 in all, with the split syntax of tfds.
_PER_DIGIT, _HELD_OUT_PER_DIGIT = 400, 50
_FIT = _PER_DIGIT - _HELD_OUT_PER_DIGIT
HELD_OUT = {
  'pp.train': '+'.join(
    f'train[{d * _PER_DIGIT}:{d * _PER_DIGIT + _FIT}]' for d in range(10)
  ),
  'pp.test': '+'.join(
    f'train[{d * _PER_DIGIT + _FIT}:{(d + 1) * _PER_DIGIT}]' for d in range(10)
  ),
}

# The recipe before the sweep: ViT-Mini_7 (MLP 512), a random shift of up
# to 2 px, AdamW at 1e-3 with weight decay 0.05, 800 steps, one view per
# evaluated image. Every trial starts from it, whatever configs/scratch.py
# holds now, so the table can be regenerated.
BEFORE_MODEL = 'mini7'
BEFORE = {
  'pp.augment': 'pad_and_crop',
  'total_steps': 800,
  'base_lr': 1e-3,
  'weight_decay': 0.05,
  'eval_shift': 0,
}
_AFFINE = {
  'pp.augment': 'affine',
  'pp.rotate': 15.0,
  'pp.scale': 0.15,
  'pp.shear': 10.0,
}
_MLP256 = {
  'model.model_name': 'ViT-Mini_7-mlp256',
  'model.transformer.mlp_dim': 256,
}
# ViT_C: 3x3 stride-2 convolutions instead of the 7x7 patches (the same
# 4x4 grid at 28x28 with three of them).
_STEM = {'model.conv_stem': (16, 32, 64), 'model.patches.size': (1, 1)}
_PATCH4 = {
  'model.model_name': 'ViT-Mini_4-mlp256',
  'model.patches.size': (4, 4),
  'model.transformer.mlp_dim': 256,
}

# The plain ViT's best: affine, MLP 256, 2000 steps at 2e-3.
_PLAIN_BEST = {**_AFFINE, **_MLP256, 'total_steps': 2000, 'base_lr': 2e-3}
_STEM_BEST = {**_PLAIN_BEST, **_STEM}
# The second round's choice: the stem with weight decay 0.5.
_WD_BEST = {**_STEM_BEST, 'weight_decay': 0.5}
# Simard et al.'s elastic distortion at 28x28, after the affine map.
_ELASTIC = {'pp.elastic': 34.0, 'pp.elastic_sigma': 4.0}


def _with_seeds(name: str, changes: Dict[str, Any]) -> Dict[str, Any]:
  """Trial `name` and its reruns with seeds 1 and 2 (`name_seed1`, ...)."""
  return {
    name: changes,
    **{f'{name}_seed{s}': {**changes, 'seed': s} for s in (1, 2)},
  }


# name: the keys each trial changes in BEFORE.
FIRST_ROUND: Dict[str, Dict[str, Any]] = {
  'before': {},
  'affine_mlp256_2000': {**_AFFINE, **_MLP256, 'total_steps': 2000},
  'affine_mlp256_2000_lr2e-3': _PLAIN_BEST,
  'affine_mlp256_2000_lr3e-3': {**_PLAIN_BEST, 'base_lr': 3e-3},
  'affine_mlp256_2000_lr2e-3_dropout0.1': {
    **_PLAIN_BEST,
    'model.transformer.dropout_rate': 0.1,
  },
  'affine_mlp256_batch64_3600_lr2e-3': {
    **_AFFINE,
    **_MLP256,
    'batch': 64,
    'total_steps': 3600,
    'base_lr': 2e-3,
  },
  'stem32-64-128_affine_mlp256_2000_lr2e-3': {
    **_STEM_BEST,
    'model.conv_stem': (32, 64, 128),
  },
  'stem16-32-64_affine_mlp256_2000_lr2e-3': _STEM_BEST,
  'stem16-32-64_affine_mlp256_2000_lr2e-3_seed1': {**_STEM_BEST, 'seed': 1},
  'stem16-32-64_affine_mlp256_2000_lr3e-3': {**_STEM_BEST, 'base_lr': 3e-3},
  'stem16-32-64_affine_mlp256_2300_lr2e-3': {
    **_STEM_BEST,
    'total_steps': 2300,
  },
  'stem16-32-64_depth4_affine_mlp256_3000_lr2e-3': {
    **_STEM_BEST,
    'total_steps': 3000,
    'model.transformer.num_layers': 4,
  },
  'stem32-64_patch2same_affine_mlp256_2000_lr2e-3': {
    **_PLAIN_BEST,
    'model.conv_stem': (32, 64),
    'model.patches.size': (2, 2),
    'model.patches.padding': 'SAME',
  },
  'patch4_affine_mlp256_700': {**_AFFINE, **_PATCH4, 'total_steps': 700},
  'patch4_affine_mlp256_700_lr3e-3': {
    **_AFFINE,
    **_PATCH4,
    'total_steps': 700,
    'base_lr': 3e-3,
  },
}

# The second round, on the chosen stem trial: changes to it, most with
# seeds 0, 1 and 2, since one seed's spread is as large as their effect.
_CHOSEN = 'stem16-32-64_affine_mlp256_2000_lr2e-3'
SECOND_ROUND: Dict[str, Dict[str, Any]] = {
  **_with_seeds(_CHOSEN, _STEM_BEST),
  f'{_CHOSEN}_ema0.998': {**_STEM_BEST, 'ema_decay': 0.998},
  f'{_CHOSEN}_ema0.999': {**_STEM_BEST, 'ema_decay': 0.999},
  f'{_CHOSEN}_elastic34-4': {**_STEM_BEST, **_ELASTIC},
  f'{_CHOSEN}_elastic34-4_seed1': {**_STEM_BEST, **_ELASTIC, 'seed': 1},
  **_with_seeds(f'{_CHOSEN}_wd0.5', _WD_BEST),
  **_with_seeds(f'{_CHOSEN}_wd1', {**_STEM_BEST, 'weight_decay': 1.0}),
  'stem16-32-64_affine_mlp256_batch256_1000_lr3e-3_wd0.5': {
    **_WD_BEST,
    'batch': 256,
    'total_steps': 1000,
    'base_lr': 3e-3,
  },
  f'{_CHOSEN}_wd0.5_constant_ema0.998': {
    **_WD_BEST,
    'decay_type': 'constant',
    'ema_decay': 0.998,
  },
}
# The third round, on the second's choice: the same trained weights (the
# same seeds; evaluation does not change training), scored by the mean
# softmax over the copies of each image shifted by up to 1 or 2 px.
THIRD_ROUND: Dict[str, Dict[str, Any]] = {
  **_with_seeds(f'{_CHOSEN}_wd0.5_shift1', {**_WD_BEST, 'eval_shift': 1}),
  **_with_seeds(f'{_CHOSEN}_wd0.5_shift2', {**_WD_BEST, 'eval_shift': 2}),
}
ROUNDS = {'1': FIRST_ROUND, '2': SECOND_ROUND, '3': THIRD_ROUND}
TRIALS = {**FIRST_ROUND, **SECOND_ROUND, **THIRD_ROUND}


def trial_config(changes: Dict[str, Any]):
  """`BEFORE` with `changes`, on the held-out slice, evaluated and
  checkpointed at the end only. A change may add a model option (e.g.
  `model.conv_stem`) that the model config does not list."""
  config = scratch.get_config(f'mnist5k,{BEFORE_MODEL}')
  with config.unlocked():
    config.update_from_flattened_dict({**BEFORE, **changes, **HELD_OUT})
  config.checkpoint_every = config.total_steps
  return config


def run_trial(name: str, out: str) -> Dict[str, Any]:
  """One row: trains trial `name` unless it finished in `out` before."""
  workdir = os.path.join(out, name)
  results = runs.finished_or_trained(trial_config(TRIALS[name]), workdir)
  return {
    'trial': name,
    'changes': TRIALS[name],
    'held_out_accuracy': results['test_accuracy'],
    'held_out_examples': results['test_examples'],
    'held_out_loss': results['test_loss'],
    # Runs recorded before `eval_shift` existed scored one view.
    'eval_views': results.get('eval_views', 1),
    'one_view_accuracy': results.get(
      'test_one_view_accuracy', results['test_accuracy']
    ),
    'wall_time_s': results['wall_time_s'],
  }


def results_table(rows: List[Dict[str, Any]]) -> str:
  """The Markdown table of the rows; with a one-view accuracy column when
  some trial averaged over shifted views."""
  with_views = any(r['eval_views'] > 1 for r in rows)
  views_head = ' | one view' if with_views else ''
  lines = [
    '| trial | changes to the recipe before the sweep | held-out accuracy'
    f'{views_head} | held-out loss | train + eval time |',
    '|---|---|---:|---:|---:' + ('|---:' if with_views else '') + '|',
  ]
  for r in rows:
    changes = ', '.join(f'`{k}={v}`' for k, v in r['changes'].items())
    one_view = f' | {100 * r["one_view_accuracy"]:.1f}%' if with_views else ''
    lines.append(
      f'| {r["trial"]} | {changes} | {100 * r["held_out_accuracy"]:.1f}% '
      f'of {r["held_out_examples"]}{one_view} | {r["held_out_loss"]:.4f} '
      f'| {r["wall_time_s"]:.0f} s |'
    )
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True)
  parser.add_argument(
    '--round', choices=sorted(ROUNDS), help='the trials of one round'
  )
  parser.add_argument(
    '--trials', help=f'some of {list(TRIALS)} (default: all, or the round)'
  )
  args = parser.parse_args()
  if args.trials:
    names = args.trials.split(',')
  else:
    names = list(ROUNDS[args.round] if args.round else TRIALS)
  unknown = sorted(set(names) - set(TRIALS))
  if unknown:
    parser.error(f'unknown trials {unknown}; choose from {list(TRIALS)}')
  rows = []
  for name in names:
    rows.append(run_trial(name, args.out))
    text = results_table(rows)
    runs.write_table(args.out, text, rows)
  print(text)


if __name__ == '__main__':
  main()
