"""The encoder's two parameter layouts, and the one place that converts them.

A ViT built with `config.model.transformer.scan=True` runs its encoder
blocks under `nn.scan`, so its blocks are one module whose leaves are
stacked over the layers (`models.vit.SCANNED_BLOCK`):

  per layer (default)   Transformer/encoderblock_{i}/<path>       shape S
  scanned               Transformer/encoderblock/<path>  [num_layers] + S

Files always hold the per-layer names: Google `.npz`, task files, timm and
Hugging Face exports, published folders. So a scanned model reads and writes
the files an unscanned one does, and the two exchange them. The checkpoint
code converts where parameters enter a model (`load_pretrained`,
`task_file.load_task_params`: to the layout of the tree they go into) and
where they leave it (`checkpoint.save`, `task_file.save_task_params`:
`to_file_layout`). Resumable training checkpoints (Orbax) keep the model's
own layout: the same config resumes them.

The conversions work on any tree of nested dicts (dict or FrozenDict; the
result has the input's mapping types), wherever the blocks sit in it (under
`params`, `Transformer`, ...), with any leaves inside the blocks (injected
adapters, LoRA matrices): arrays (NumPy stays NumPy) and
`jax.ShapeDtypeStruct`s.
"""

import re
from typing import Any, Dict, List, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import vit

PyTree = Any

# The scanned blocks' module name.
STACKED = vit.SCANNED_BLOCK
_LAYER = re.compile(r'encoderblock_(\d+)')


def _rebuilt(node: Mapping[str, Any], items: Dict[str, Any]) -> Mapping:
  """`items` as a mapping of `node`'s kind (FrozenDict or dict)."""
  if isinstance(node, flax.core.FrozenDict):
    return flax.core.FrozenDict(items)
  return items


def _layers(node: Mapping[str, Any]) -> Dict[int, str]:
  """{layer index: key} of the per-layer blocks directly in `node`."""
  return {
    int(match.group(1)): key
    for key in node
    if isinstance(key, str) and (match := _LAYER.fullmatch(key))
  }


def _stack(leaves: List[Any]) -> Any:
  """One leaf per layer → one leaf with a leading layer axis."""
  first = leaves[0]
  if isinstance(first, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(leaves),) + first.shape, first.dtype)
  if all(isinstance(leaf, (np.ndarray, np.generic)) for leaf in leaves):
    return np.stack(leaves)
  return jnp.stack(leaves)


def _split(leaf: Any, layer: int) -> Any:
  """Layer `layer` of a stacked leaf."""
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
  return leaf[layer]


def _stacked_block(blocks: List[Any], where: str) -> Any:
  """The per-layer blocks' trees as one tree of stacked leaves; a
  ValueError when the layers differ in paths, shapes or dtypes."""
  structure = jax.tree.structure(blocks[0])
  for layer, block in enumerate(blocks):
    if jax.tree.structure(block) != structure:
      raise ValueError(
        f'{where}encoderblock_{layer} has other parameters than '
        f'{where}encoderblock_0; only blocks of one structure stack.'
      )
  kinds = [
    {(np.shape(leaf), np.dtype(leaf.dtype)) for leaf in same}
    for same in zip(*(jax.tree.leaves(block) for block in blocks))
  ]
  if any(len(kind) > 1 for kind in kinds):
    raise ValueError(
      f'The layers under {where or "the root"} have parameters of '
      'different shapes or dtypes; only blocks of one shape stack.'
    )
  return jax.tree.map(lambda *leaves: _stack(list(leaves)), *blocks)


def stack_layers(params: PyTree, num_layers: Optional[int] = None) -> PyTree:
  """Per-layer blocks → one scanned block (see the module docstring).

  Every mapping in `params` that holds `encoderblock_0` ... `encoderblock_
  {N-1}` gets them replaced by `encoderblock`, each leaf stacked on a new
  axis 0 (layer i at index i). A tree without per-layer blocks (already
  stacked, or no encoder) is returned unchanged.

  Args:
    params: a tree of nested dicts, e.g. a model's `params`.
    num_layers: the number of blocks expected (`transformer.num_layers`);
      None takes as many as there are.

  Raises:
    ValueError: when the blocks are not numbered 0 .. num_layers - 1, a
      mapping holds both layouts, or the blocks differ in structure.
  """

  def visit(node: Any, where: str) -> Any:
    if not isinstance(node, Mapping):
      return node
    layers = _layers(node)
    if not layers:
      return _rebuilt(
        node,
        {key: visit(value, f'{where}{key}/') for key, value in node.items()},
      )
    count = len(layers) if num_layers is None else num_layers
    if sorted(layers) != list(range(count)):
      raise ValueError(
        f'{where or "The root"} holds blocks {sorted(layers)}; stacking '
        f'needs encoderblock_0 .. encoderblock_{count - 1}.'
      )
    if STACKED in node:
      raise ValueError(
        f'{where} holds both {STACKED} and {STACKED}_0: a tree in two '
        'layouts at once.'
      )
    items = {}
    for key, value in node.items():  # The stacked block where block 0 was.
      if key == layers[0]:
        items[STACKED] = _stacked_block(
          [node[layers[layer]] for layer in range(count)], where
        )
      elif key not in layers.values():
        items[key] = visit(value, f'{where}{key}/')
    return _rebuilt(node, items)

  return visit(params, '')


def unstack_layers(params: PyTree) -> PyTree:
  """One scanned block → per-layer blocks; the inverse of `stack_layers`.

  Every `encoderblock` mapping in `params` becomes `encoderblock_0` ...
  `encoderblock_{N-1}`, where N is its leaves' leading dimension. A tree
  without a scanned block is returned unchanged.

  Raises:
    ValueError: when the stacked leaves disagree on the number of layers.
  """

  def visit(node: Any, where: str) -> Any:
    if not isinstance(node, Mapping):
      return node
    if STACKED not in node:
      return _rebuilt(
        node,
        {key: visit(value, f'{where}{key}/') for key, value in node.items()},
      )
    if _layers(node):
      raise ValueError(
        f'{where} holds both {STACKED} and {STACKED}_0: a tree in two '
        'layouts at once.'
      )
    block = node[STACKED]
    counts = {np.shape(leaf)[0] for leaf in jax.tree.leaves(block)}
    if len(counts) != 1:
      raise ValueError(
        f'{where}{STACKED} has leaves stacked over different numbers of '
        f'layers: {sorted(counts)}.'
      )
    (count,) = counts
    items = {}
    for key, value in node.items():  # The blocks where the stacked one was.
      if key != STACKED:
        items[key] = visit(value, f'{where}{key}/')
        continue
      for layer in range(count):
        items[f'{STACKED}_{layer}'] = jax.tree.map(
          lambda leaf, layer=layer: _split(leaf, layer), block
        )
    return _rebuilt(node, items)

  return visit(params, '')


def stacked_path(path: str) -> str:
  """The '/'-joined path of a per-layer leaf in the scanned layout:
  'Transformer/encoderblock_3/LayerNorm_0/scale' →
  'Transformer/encoderblock/LayerNorm_0/scale'."""
  return '/'.join(
    STACKED if _LAYER.fullmatch(part) else part for part in path.split('/')
  )


def is_stacked(params: PyTree) -> bool:
  """Whether any mapping in `params` holds a scanned block."""
  if not isinstance(params, Mapping):
    return False
  return STACKED in params or any(is_stacked(v) for v in params.values())


def scans(model_config: Mapping[str, Any]) -> bool:
  """Whether a model config (`config.model`, or a record of one) builds a
  scanned encoder."""
  transformer = model_config.get('transformer') or {}
  return bool(transformer.get('scan', False))


def to_model_layout(params: PyTree, model_config: Mapping[str, Any]) -> PyTree:
  """`params` in the layout of the model `model_config` builds: stacked
  for `transformer.scan`, per layer otherwise."""
  if scans(model_config):
    return stack_layers(params, model_config['transformer']['num_layers'])
  return unstack_layers(params)


def to_file_layout(params: PyTree) -> PyTree:
  """`params` as files hold them: per-layer blocks."""
  return unstack_layers(params)


def like(params: PyTree, reference: PyTree) -> PyTree:
  """`params` in the layout of `reference` (a tree of the same model)."""
  if is_stacked(reference):
    return stack_layers(params)
  return unstack_layers(params)
