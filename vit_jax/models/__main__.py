"""`python -m vit_jax.models --table`: parameters and GFLOPs of every model."""

import argparse
import sys

from vit_jax.models import table


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m vit_jax.models', description=__doc__)
  parser.add_argument('--table', action='store_true',
                      help='print the model table (Markdown)')
  parser.add_argument('--num_classes', type=int, default=1000,
                      help='head width used for the parameter counts')
  parser.add_argument('--models', nargs='*', default=None,
                      help='registered names to include (default: all)')
  args = parser.parse_args(argv)
  if not args.table:
    parser.print_help()
    return 2
  print(table.model_table(args.models, args.num_classes))
  return 0


if __name__ == '__main__':
  sys.exit(main())
