"""Which parameters train: one labelling of the tree, and splits by label.

`label_params(params, is_trainable)` gives every leaf the label `TRAINABLE`
or `FROZEN`. The same labels drive the optimizer (`optax.multi_transform`
gives frozen leaves `set_to_zero` and no state) and the train step, which
differentiates only the trainable part (`partition`), so no gradient of a
frozen weight is ever computed.
"""

from typing import Any, Callable, Optional, Tuple

from vit_jax.checkpoint import inspect

PyTree = Any
TRAINABLE = 'trainable'
FROZEN = 'frozen'


def label_params(params: PyTree, is_trainable: Callable[[str], bool]
                 ) -> PyTree:
  """The tree of `params` with each leaf replaced by its label.

  Args:
    params: nested dicts of arrays.
    is_trainable: predicate on a leaf's '/'-joined path.

  Raises:
    ValueError: if nothing is trainable (the run would be a no-op).
  """
  flat = {path: TRAINABLE if is_trainable(path) else FROZEN
          for path in inspect.flatten(params)}
  if TRAINABLE not in flat.values():
    raise ValueError(
        'No parameter is trainable under this fine-tuning mode; the model has '
        f'{sorted(flat)[:5]}... Check config.finetune.')
  return inspect.unflatten(flat)


def split(params: PyTree, predicate: Callable[[str], bool]
          ) -> Tuple[PyTree, PyTree]:
  """(leaves whose path satisfies `predicate`, the others), as nested dicts."""
  flat = inspect.flatten(params)
  return (inspect.unflatten({p: v for p, v in flat.items() if predicate(p)}),
          inspect.unflatten({p: v for p, v in flat.items()
                             if not predicate(p)}))


def partition(params: PyTree, labels: PyTree) -> Tuple[PyTree, PyTree]:
  """(trainable, frozen): two nested dicts that together hold every leaf."""
  flat_labels = inspect.flatten(labels)
  return split(params, lambda path: flat_labels[path] == TRAINABLE)


def combine(*trees: PyTree) -> PyTree:
  """One nested dict with the leaves of disjoint trees (inverse of partition)."""
  flat = {}
  for tree in trees:
    flat.update(inspect.flatten(tree))
  return inspect.unflatten(flat)


def count(params: PyTree, labels: PyTree,
          label: Optional[str] = TRAINABLE) -> int:
  """Number of scalar values in the leaves with `label` (None: all)."""
  flat_labels = inspect.flatten(labels)
  return sum(int(getattr(v, 'size', 1))
             for p, v in inspect.flatten(params).items()
             if label is None or flat_labels[p] == label)
