"""Command line: what each fine-tuning mode trains, and exporting tasks.

  python -m vit_jax.finetune sizes --model=ViT-B_16 --num_classes=10 --crop=384
  python -m vit_jax.finetune export --base=upstream.npz \
      --task=runs/digits_ia3/task_params.npz --out=digits_ia3.npz
  python -m vit_jax.finetune publish --workdir=/tmp/vit_mnist5k \
      --out=/tmp/vit_mnist5k_model

`sizes` builds every mode's parameter tree from shapes alone (no weights,
no download) and prints trainable parameters and their float32 size against
the whole model's. `export` writes base + task file as one plain checkpoint,
injected methods folded into the weights (`.npz`: Google names,
`.safetensors`: timm names). `publish` writes a finished run as a folder
to share (see `vit_jax.finetune.publish`).
"""

import argparse
import os
import sys
from typing import List, Optional


from vit_jax import models
from vit_jax.models import table
from vit_jax.finetune import labels as labels_lib
from vit_jax.finetune import methods
from vit_jax.finetune import modes
from vit_jax.finetune import publish
from vit_jax.finetune import serving


def _size(values: int) -> str:
  """Float32 bytes of `values`, in the largest unit that keeps it >= 1."""
  size = 4.0 * values
  for unit in ('B', 'KB', 'MB', 'GB'):
    if size < 1000 or unit == 'GB':
      return f'{size:.0f} {unit}' if unit == 'B' else f'{size:.1f} {unit}'
    size /= 1000
  raise AssertionError('unreachable')


def sizes(model: str, num_classes: int, crop: int, rank: int = 8,
          mlp_dim: int = 256) -> str:
  """A table of trainable parameters per mode for a registered model."""
  model_config = models.MODEL_CONFIGS[model].to_dict()
  rows = [('full', 'linear', None), ('head', 'linear', None),
          ('head', 'mlp', None)]
  rows += [('injection', 'linear', name) for name in sorted(methods.METHODS)]
  lines = [f'{model}, {num_classes} classes, {crop}x{crop} (LoRA rank {rank}, '
           f'MLP head width {mlp_dim}; each method on its default targets)',
           f'{"mode":10} {"head":6} {"method":7} {"trainable":>12} '
           f'{"% of total":>10} {"float32":>9} {"whole model":>11}']
  for mode, head, method in rows:
    finetune = {
        'mode': mode, 'head': {'type': head, 'mlp_dim': mlp_dim,
                               'dropout': 0.0},
        'injection': {'method': method, 'targets': None, 'rank': rank,
                      'alpha': float(rank)}}
    fine = modes.from_config(finetune)
    net = modes.build_model({'model': model_config, 'finetune': finetune,
                             'dtype': 'float32'}, num_classes, fine)
    params = table.abstract_variables(net, crop)['params']
    labels = labels_lib.label_params(params, fine.is_trainable)
    trainable = labels_lib.count(params, labels)
    total = labels_lib.count(params, labels, None)
    lines.append(f'{mode:10} {head:6} {method or "-":7} {trainable:12,d} '
                 f'{100 * trainable / total:9.3f}% {_size(trainable):>9} '
                 f'{_size(total):>11}')
  return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> None:
  parser = argparse.ArgumentParser(prog='python -m vit_jax.finetune',
                                   description=__doc__.split('\n')[0])
  commands = parser.add_subparsers(dest='command', required=True)
  size_parser = commands.add_parser('sizes', help='trainable parameters of '
                                    'every mode, from shapes')
  size_parser.add_argument('--model', default='ViT-B_16',
                           choices=sorted(models.MODEL_CONFIGS))
  size_parser.add_argument('--num_classes', type=int, default=10)
  size_parser.add_argument('--crop', type=int, default=224)
  size_parser.add_argument('--rank', type=int, default=8)
  size_parser.add_argument('--mlp_dim', type=int, default=256)
  export_parser = commands.add_parser('export', help='base + task file → one '
                                      'plain checkpoint')
  export_parser.add_argument('--base', required=True)
  export_parser.add_argument('--task', required=True)
  export_parser.add_argument('--out', required=True,
                             help='.npz (Google names) or .safetensors (timm)')
  publish_parser = commands.add_parser(
      'publish', help='a finished run → a folder to share (weights for '
      'vit_jax and timm, config, class names, model card)')
  publish_parser.add_argument('--workdir', required=True,
                              help='the run\'s workdir')
  publish_parser.add_argument('--out', required=True,
                              help='the folder to create')
  publish_parser.add_argument('--base', default=None,
                              help='base checkpoint of the task file '
                              '(default: the one the run recorded)')
  args = parser.parse_args(argv)
  if args.command == 'sizes':
    print(sizes(args.model, args.num_classes, args.crop, args.rank,
                args.mlp_dim))
  elif args.command == 'publish':
    out = publish.publish(args.workdir, args.out, args.base)
    for name in sorted(os.listdir(out)):
      print(f'{os.path.join(out, name)}: '
            f'{os.path.getsize(os.path.join(out, name)):,} bytes')
  else:
    task, = serving.load_tasks(args.base, [args.task]).values()
    serving.export(task, args.out)
    print(f'{args.out}: {task.name} ({task.finetune.describe()}) as a plain '
          'checkpoint.')


if __name__ == '__main__':
  main(sys.argv[1:])
