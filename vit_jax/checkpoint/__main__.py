"""Inspect and convert checkpoints from the command line.

python -m vit_jax.checkpoint inspect FILE [--num_heads N]
python -m vit_jax.checkpoint convert IN OUT --to npz|safetensors [--num_heads N]
"""

import argparse
from typing import Any, Iterable, List, Mapping, Sequence

import numpy as np

from vit_jax import checkpoint
from vit_jax import cli
from vit_jax.checkpoint import inspect
from vit_jax.checkpoint import task_file


def _count(shapes: Iterable[Sequence[int]]) -> int:
  """How many values arrays of these shapes hold."""
  return sum(int(np.prod(shape)) for shape in shapes)


def _task_lines(record: Mapping[str, Any]) -> List[str]:
  """What a task file's record says: its mode, what it holds, its base and
  the run that wrote it."""
  metadata = record['metadata']
  base = metadata.get('pretrained_path') or 'not recorded'
  if task_file.holds_every_parameter(record):
    holds = 'every parameter: loads as a pretrained checkpoint'
  else:
    shapes = record['base_shapes'].values()
    holds = (
      f'the trained parameters; {_count(shapes):,} more in {len(shapes)} '
      'arrays are in its base (python -m vit_jax.finetune export joins them)'
    )
    base += f' (fingerprint {record["base_fingerprint"][:12]})'
  run = ', '.join(
    f'{key} {metadata[key]}'
    for key in ('dataset', 'num_classes', 'crop', 'test_accuracy')
    if key in metadata
  )
  model = (metadata.get('model') or {}).get('model_name') or 'not recorded'
  return [
    f'format: vit_jax task file, finetune.mode={task_file.mode(record)!r}',
    f'holds: {holds}',
    f'base: {base}',
    f'model: {model}; run: {run or "not recorded"}',
  ]


def _inspect(args: argparse.Namespace) -> None:
  ckpt = checkpoint.read(args.file, num_heads=args.num_heads, partial=True)
  flat = inspect.flatten(ckpt.params)
  width = max(len(path) for path in flat)
  for path, value in sorted(flat.items()):
    print(f'{path:<{width}}  {str(value.shape):<20} {value.dtype}')
  print()
  if ckpt.task is None:
    print(f'format: {ckpt.format}')
  else:
    print('\n'.join(_task_lines(ckpt.task)))
  total = _count(value.shape for value in flat.values())
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
