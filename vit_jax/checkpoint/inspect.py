"""Compare a loaded parameter tree with the tree a model expects."""

import dataclasses
from typing import Any, Dict, List, Mapping, Tuple

import flax
import numpy as np

Shape = Tuple[int, ...]


def flatten(tree: Mapping[str, Any]) -> Dict[str, Any]:
  """Nested dict → {'a/b/c': leaf}."""
  return flax.traverse_util.flatten_dict(dict(tree), sep='/')


def unflatten(flat: Mapping[str, Any]) -> Dict[str, Any]:
  """{'a/b/c': leaf} → nested dict."""
  return flax.traverse_util.unflatten_dict(dict(flat), sep='/')


def shapes(tree: Mapping[str, Any]) -> Dict[str, Shape]:
  """{'a/b/c': shape} of a nested tree of arrays or ShapeDtypeStructs."""
  return {path: tuple(np.shape(leaf)) for path, leaf in flatten(tree).items()}


@dataclasses.dataclass(frozen=True)
class TreeDiff:
  """How a loaded tree differs from the expected one, path by path."""

  missing: List[str]  # Expected by the model, absent from the file.
  unexpected: List[str]  # In the file, unknown to the model.
  mismatched: List[Tuple[str, Shape, Shape]]  # (path, loaded, expected)

  @property
  def ok(self) -> bool:
    return not (self.missing or self.unexpected or self.mismatched)

  def report(
    self, limit: int = 20, loaded: str = 'checkpoint', expected: str = 'model'
  ) -> str:
    """Human-readable listing, at most `limit` paths per kind.

    `loaded` and `expected` name the two trees compared.
    """
    lines = []
    for title, items in (
      (f'missing from the {loaded}', self.missing),
      (f'not in the {expected}', self.unexpected),
    ):
      if items:
        lines.append(f'{len(items)} parameter(s) {title}:')
        lines += [f'  {path}' for path in items[:limit]]
        if len(items) > limit:
          lines.append(f'  ... and {len(items) - limit} more')
    if self.mismatched:
      lines.append(
        f'{len(self.mismatched)} shape mismatch(es) ({loaded} vs {expected}):'
      )
      lines += [
        f'  {path}: {got} vs {want}'
        for path, got, want in self.mismatched[:limit]
      ]
      if len(self.mismatched) > limit:
        lines.append(f'  ... and {len(self.mismatched) - limit} more')
    return '\n'.join(lines) or 'trees match'


def _shallow_first(paths) -> List[str]:
  """Sorted with top-level paths (embedding, cls, head) before deep ones."""
  return sorted(paths, key=lambda path: (path.count('/'), path))


def compare(
  loaded: Mapping[str, Shape], expected: Mapping[str, Shape]
) -> TreeDiff:
  """Diff of two {path: shape} maps."""
  return TreeDiff(
    missing=_shallow_first(set(expected) - set(loaded)),
    unexpected=_shallow_first(set(loaded) - set(expected)),
    mismatched=[
      (path, tuple(loaded[path]), tuple(expected[path]))
      for path in _shallow_first(set(loaded) & set(expected))
      if tuple(loaded[path]) != tuple(expected[path])
    ],
  )
