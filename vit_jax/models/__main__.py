"""`python -m vit_jax.models --table`: parameters and GFLOPs of every model."""

import argparse

from vit_jax import cli
from vit_jax import models
from vit_jax.models import table


def parser() -> argparse.ArgumentParser:
  """`python -m vit_jax.models`'s command line."""
  result = argparse.ArgumentParser(
    prog='python -m vit_jax.models', description=__doc__
  )
  result.add_argument(
    '--table', action='store_true', help='print the model table (Markdown)'
  )
  result.add_argument(
    '--num_classes',
    type=int,
    default=1000,
    help='head width used for the parameter counts',
  )
  result.add_argument(
    '--models',
    nargs='*',
    default=None,
    metavar='NAME',
    choices=sorted(models.MODEL_CONFIGS),
    help='registered names to include (default: all)',
  )
  return result


def main(args: argparse.Namespace) -> int:
  if not args.table:
    parser().print_help()
    return 2
  print(table.model_table(args.models, args.num_classes))
  return 0


if __name__ == '__main__':
  cli.run_argparse(main, parser())
