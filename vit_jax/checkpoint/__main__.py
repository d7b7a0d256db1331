"""Inspect and convert checkpoints from the command line.

python -m vit_jax.checkpoint inspect FILE [--num_heads N]
python -m vit_jax.checkpoint convert IN OUT --to npz|safetensors [--num_heads N]
"""

import argparse

import numpy as np

from vit_jax import checkpoint
from vit_jax import cli
from vit_jax.checkpoint import inspect


def _inspect(args: argparse.Namespace) -> None:
  ckpt = checkpoint.read(args.file, num_heads=args.num_heads)
  flat = inspect.flatten(ckpt.params)
  width = max(len(path) for path in flat)
  for path, value in sorted(flat.items()):
    print(f'{path:<{width}}  {str(value.shape):<20} {value.dtype}')
  total = sum(int(np.prod(value.shape)) for value in flat.values())
  print(f'\nformat: {ckpt.format}')
  print(f'parameters: {total:,} in {len(flat)} arrays')
  if ckpt.model_options:
    print(f'model options: {ckpt.model_options}')


def _convert(args: argparse.Namespace) -> None:
  if not args.output.endswith('.' + args.to):
    raise checkpoint.CheckpointError(
      f'{args.output}: --to {args.to} needs a .{args.to} file name.'
    )
  ckpt = checkpoint.read(args.input, num_heads=args.num_heads)
  checkpoint.save(args.output, ckpt.params, num_heads=args.num_heads)
  print(f'{args.input} ({ckpt.format}) → {args.output} ({args.to})')


def parser() -> argparse.ArgumentParser:
  """`python -m vit_jax.checkpoint`'s command line."""
  result = argparse.ArgumentParser(
    prog='python -m vit_jax.checkpoint', description=__doc__.splitlines()[0]
  )
  commands = result.add_subparsers(dest='command', required=True)
  show = commands.add_parser('inspect', help='print paths, shapes, dtypes')
  show.add_argument('file')
  convert = commands.add_parser('convert', help='convert between formats')
  convert.add_argument('input')
  convert.add_argument('output')
  convert.add_argument('--to', choices=('npz', 'safetensors'), required=True)
  for command in (show, convert):
    command.add_argument(
      '--num_heads',
      type=int,
      default=None,
      help='attention heads; needed to read timm/HF files and to write '
      'safetensors (e.g. 3 Ti, 6 S, 12 B, 16 L/H)',
    )
  return result


def main(args: argparse.Namespace) -> None:
  (_inspect if args.command == 'inspect' else _convert)(args)


if __name__ == '__main__':
  cli.run_argparse(main, parser())
