"""vit_jax: Vision Transformers in JAX/Flax, compatible with Google's vit_jax."""

import sys

__version__ = '0.1.0'

# `python -m vit_jax.X` imports this package first, with sys.argv[0] == '-m'
# while it locates X: the command line's libraries are quieted before X's
# package imports them.
if sys.argv[:1] == ['-m']:
  from vit_jax import cli

  cli.quiet_libraries(cli.verbose_in(sys.argv))
