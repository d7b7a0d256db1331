"""Command line: what each fine-tuning mode trains, and exporting tasks.

  python -m vit_jax.finetune sizes --model=ViT-B_16 --num_classes=10 --crop=384
  python -m vit_jax.finetune export --base=upstream.npz \\
      --task=runs/digits_ia3/task_params.npz --out=digits_ia3.npz

`sizes` builds the parameter tree of every fine-tuning preset
(`modes.presets()`) from shapes alone (no weights, no download) and prints
trainable parameters and their float32 size against the whole model's.
`export` writes base + task file as one plain checkpoint, injected methods
folded into the weights (`.npz`: Google names, `.safetensors`: timm names).
A finished run becomes a folder to share with `python -m vit_jax.publish`.
"""

import argparse

import ml_collections

from vit_jax import cli
from vit_jax import models
from vit_jax import trainable as trainable_lib
from vit_jax.finetune import modes
from vit_jax.finetune import serving
from vit_jax.models import table


def _size(values: int) -> str:
  """Float32 bytes of `values`, in the largest unit that keeps it >= 1."""
  size = 4.0 * values
  for unit in ('B', 'KB', 'MB', 'GB'):
    if size < 1000 or unit == 'GB':
      return f'{size:.0f} {unit}' if unit == 'B' else f'{size:.1f} {unit}'
    size /= 1000
  raise AssertionError('unreachable')


def sizes(
  model: str, num_classes: int, crop: int, rank: int = 8, mlp_dim: int = 256
) -> str:
  """A table of trainable parameters per fine-tuning preset of a model."""
  model_config = models.MODEL_CONFIGS[model].to_dict()
  lines = [
    f'{model}, {num_classes} classes, {crop}x{crop} (LoRA rank {rank}, '
    f'MLP head width {mlp_dim}; each method on its default targets)',
    f'{"mode":10} {"trainable":>12} {"% of total":>10} '
    f'{"float32":>9} {"whole model":>11}',
  ]
  for name, preset in modes.presets().items():
    finetune = ml_collections.ConfigDict(
      {
        'mode': 'full',
        'trainable': '',
        'head': {'type': 'linear', 'mlp_dim': mlp_dim, 'dropout': 0.0},
        'injection': {
          'method': None,
          'targets': None,
          'rank': rank,
          'alpha': float(rank),
        },
      }
    )
    finetune.update(preset)
    finetune = finetune.to_dict()
    fine = modes.from_config(finetune)
    net = modes.build_model(
      {'model': model_config, 'finetune': finetune, 'dtype': 'float32'},
      num_classes,
      fine,
    )
    params = table.abstract_variables(net, crop)['params']
    trainable = trainable_lib.count(params, fine.is_trainable)
    total = trainable_lib.count(params)
    lines.append(
      f'{name:10} {trainable:12,d} '
      f'{100 * trainable / total:9.3f}% {_size(trainable):>9} '
      f'{_size(total):>11}'
    )
  return '\n'.join(lines)


def parser() -> argparse.ArgumentParser:
  """`python -m vit_jax.finetune`'s command line."""
  result = argparse.ArgumentParser(
    prog='python -m vit_jax.finetune', description=__doc__.split('\n')[0]
  )
  commands = result.add_subparsers(dest='command', required=True)
  size_parser = commands.add_parser(
    'sizes', help='trainable parameters of every preset, from shapes'
  )
  size_parser.add_argument(
    '--model', default='ViT-B_16', choices=sorted(models.MODEL_CONFIGS)
  )
  size_parser.add_argument('--num_classes', type=int, default=10)
  size_parser.add_argument('--crop', type=int, default=224)
  size_parser.add_argument('--rank', type=int, default=8)
  size_parser.add_argument('--mlp_dim', type=int, default=256)
  export_parser = commands.add_parser(
    'export', help='base + task file → one plain checkpoint'
  )
  export_parser.add_argument('--base', required=True)
  export_parser.add_argument('--task', required=True)
  export_parser.add_argument(
    '--out', required=True, help='.npz (Google names) or .safetensors (timm)'
  )
  return result


def main(args: argparse.Namespace) -> None:
  if args.command == 'sizes':
    print(
      sizes(args.model, args.num_classes, args.crop, args.rank, args.mlp_dim)
    )
  else:
    (task,) = serving.load_tasks(args.base, [args.task]).values()
    serving.export(task, args.out)
    print(
      f'{args.out}: {task.name} ({task.finetune.describe()}) as a plain '
      'checkpoint.'
    )


if __name__ == '__main__':
  cli.run_argparse(main, parser())
