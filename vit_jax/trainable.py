"""What trains: one predicate on parameter paths, and the splits it makes.

A run trains some leaves of its parameter tree and freezes the others. That
decision is one function, `Trainable = Callable[[str], bool]`, of a leaf's
'/'-joined path (`'Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel'`).
It is made once per run from the config (`finetune.Finetune.is_trainable`:
the fine-tuning mode, plus the regular expressions of
`config.finetune.trainable`), and everything that needs it takes it: the
train step differentiates and the optimizer updates only
`partition(params, trainable)[0]`, the task file stores those leaves, and
`count` reports them.
"""

import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import flax

from vit_jax.errors import ConfigError

PyTree = Any
Trainable = Callable[[str], bool]

HEAD = 'head'


def is_head(path: str) -> bool:
  """Whether a leaf belongs to the classification head (`head/...`)."""
  return path == HEAD or path.startswith(HEAD + '/')


def _flatten(tree: PyTree) -> Dict[str, Any]:
  return flax.traverse_util.flatten_dict(dict(tree), sep='/')


def paths(params: PyTree) -> List[str]:
  """The '/'-joined paths of the leaves of `params`."""
  return list(_flatten(params))


def _unflatten(flat: Dict[str, Any]) -> PyTree:
  return flax.traverse_util.unflatten_dict(flat, sep='/')


def parse_patterns(
  patterns: Union[str, Sequence[str], None],
  knob: str = 'config.finetune.trainable',
) -> Tuple[re.Pattern, ...]:
  """Compiled regular expressions from a comma-separated string or a list.

  Raises:
    ConfigError: naming `knob`, for an invalid expression.
  """
  if not patterns:
    return ()
  if isinstance(patterns, str):
    patterns = [p.strip() for p in patterns.split(',') if p.strip()]
  compiled = []
  for pattern in patterns:
    try:
      compiled.append(re.compile(pattern))
    except re.error as e:
      raise ConfigError(
        f'{knob}: {pattern!r} is not a regular expression ({e}); escape '
        'special characters, e.g. head/.* or .*/LayerNorm_.*'
      ) from e
  return tuple(compiled)


def matcher(patterns: Sequence[re.Pattern]) -> Trainable:
  """The predicate "the path matches one of `patterns` in full"."""
  return lambda path: any(p.fullmatch(path) for p in patterns)


def check_patterns(
  patterns: Sequence[re.Pattern],
  params: PyTree,
  knob: str = 'config.finetune.trainable',
) -> None:
  """Raises a ConfigError for a pattern that matches no parameter path."""
  paths = list(_flatten(params))
  unmatched = [
    p.pattern for p in patterns if not any(p.fullmatch(path) for path in paths)
  ]
  if unmatched:
    raise ConfigError(
      f'{knob}: {unmatched} match no parameter of this model; paths look '
      f'like {paths[:3]} (each expression must match a whole path).'
    )


def partition(params: PyTree, trainable: Trainable) -> Tuple[PyTree, PyTree]:
  """(trainable leaves, frozen leaves), two nested dicts of `params`."""
  flat = _flatten(params)
  return (
    _unflatten({p: v for p, v in flat.items() if trainable(p)}),
    _unflatten({p: v for p, v in flat.items() if not trainable(p)}),
  )


def combine(*trees: PyTree) -> PyTree:
  """One nested dict of the leaves of `trees` (undoes `partition`); where
  two trees hold the same path, the later tree's leaf is kept."""
  flat = {}
  for tree in trees:
    flat.update(_flatten(tree))
  return _unflatten(flat)


def count(params: PyTree, trainable: Optional[Trainable] = None) -> int:
  """Scalars in the leaves `trainable` selects (all leaves if None)."""
  return sum(
    int(getattr(v, 'size', 1))
    for p, v in _flatten(params).items()
    if trainable is None or trainable(p)
  )
