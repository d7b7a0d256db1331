"""Adapting pre-trained parameters to a fine-tuning model.

Three differences between a checkpoint and the model to fine-tune are
expected and handled: a head of another size (re-initialised to zeros, as
vit_jax does), a `pre_logits` layer the new model does not use (dropped), and
position embeddings for another resolution (resized on their 2-D grid).
"""

import math
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage

from vit_jax import trainable
from vit_jax.errors import CheckpointError

Grid = Tuple[int, int]
Flat = Dict[str, Any]  # {'a/b/c': array}
RESIZE_METHODS = ('bilinear', 'bicubic')


def square_grid(num_tokens: int, what: str) -> Grid:
  """(n, n) with n*n == num_tokens, or an error telling how to fix it."""
  side = math.isqrt(num_tokens)
  if side * side != num_tokens:
    raise CheckpointError(
      f'{what}: {num_tokens} patch tokens do not form a square grid; pass '
      'the (rows, columns) of the grid explicitly.'
    )
  return side, side


def resize_posemb(
  posemb: np.ndarray,
  new_grid: Grid,
  *,
  num_prefix: int,
  old_grid: Optional[Grid] = None,
  method: str = 'bilinear',
) -> np.ndarray:
  """Resizes position embeddings `[1, prefix + rows * cols, dim]` to a grid.

  The prefix tokens (the class token) keep their embeddings; the grid part is
  interpolated as an image with `dim` channels.

  Args:
    posemb: the pre-trained table.
    new_grid: (rows, columns) of the new patch grid.
    num_prefix: tokens in front of the grid (1 with a class token, else 0).
    old_grid: (rows, columns) of the pre-trained grid; default: square.
    method: 'bilinear' reproduces vit_jax (scipy.ndimage.zoom, order 1, grid
      corners aligned); 'bicubic' uses Keys' cubic kernel with half-pixel
      centres (`jax.image.resize`, as PyTorch's bicubic interpolation).

  Returns:
    The table `[1, prefix + new_rows * new_cols, dim]`, float32.
  """
  if method not in RESIZE_METHODS:
    raise CheckpointError(
      f'Unknown position-embedding resize method {method!r}; use one of '
      f'{RESIZE_METHODS}.'
    )
  prefix, grid = posemb[:, :num_prefix], posemb[0, num_prefix:]
  old_grid = old_grid or square_grid(grid.shape[0], 'pos_embedding')
  if old_grid[0] * old_grid[1] != grid.shape[0]:
    raise CheckpointError(
      f'pos_embedding has {grid.shape[0]} patch tokens, not the '
      f'{old_grid[0]}x{old_grid[1]} grid given.'
    )
  if tuple(old_grid) == tuple(new_grid):
    return np.asarray(posemb, np.float32)
  grid = grid.reshape(*old_grid, -1)
  if method == 'bilinear':
    zoom = (new_grid[0] / old_grid[0], new_grid[1] / old_grid[1], 1)
    grid = scipy.ndimage.zoom(grid, zoom, order=1)
  else:
    grid = np.asarray(
      jax.image.resize(
        jnp.asarray(grid),
        (*new_grid, grid.shape[-1]),
        method='bicubic',
        antialias=False,
      )
    )
  grid = grid.reshape(1, new_grid[0] * new_grid[1], -1)
  return np.concatenate([prefix, grid], axis=1).astype(np.float32)


def replace_head(
  loaded: Flat,
  expected: Mapping[str, Any],
  reset: bool,
  log: Callable[[str], None],
) -> Flat:
  """`loaded` with the model's initialised head, if `reset` or it differs.

  The head is every leaf under `head/` (a Dense, or an MLP head's layers); a
  loaded head that does not have the model's head paths and shapes is
  replaced whole.
  """
  new_head = {k: v for k, v in expected.items() if trainable.is_head(k)}
  old_head = {k: v for k, v in loaded.items() if trainable.is_head(k)}
  fits = {k: np.shape(v) for k, v in old_head.items()} == {
    k: np.shape(v) for k, v in new_head.items()
  }
  if not new_head or (fits and not reset):
    return loaded
  log(
    f'head {sorted((k, np.shape(v)) for k, v in old_head.items())} → '
    f'initialised {sorted((k, np.shape(v)) for k, v in new_head.items())}.'
  )
  kept = {k: v for k, v in loaded.items() if not trainable.is_head(k)}
  return {**kept, **{k: np.asarray(v) for k, v in new_head.items()}}


def adapt_to_model(
  loaded: Flat,
  expected: Mapping[str, Any],
  *,
  reset_head: bool,
  resize_method: str,
  grid: Optional[Grid],
  pretrained_grid: Optional[Grid],
  log: Callable[[str], None],
  source: str,
) -> Flat:
  """The three expected differences of a checkpoint, made to fit the model.

  `loaded` and `expected` are flat ({'a/b': array}); the head is reset (see
  `replace_head`), `pre_logits` dropped when the model has none, and the
  position embeddings resized to the model's grid. Each change is logged;
  any other difference is left for the caller's comparison to report.
  """
  if 'pre_logits/kernel' in loaded and 'pre_logits/kernel' not in expected:
    log('dropping pre_logits (model has no representation layer).')
    loaded = {
      k: v for k, v in loaded.items() if not k.startswith('pre_logits/')
    }
  loaded = replace_head(loaded, expected, reset_head, log)
  posemb = 'Transformer/posembed_input/pos_embedding'
  if (
    posemb in loaded
    and posemb in expected
    and np.shape(loaded[posemb]) != np.shape(expected[posemb])
  ):
    num_prefix = 1 if 'cls' in expected else 0
    new_tokens = np.shape(expected[posemb])[1] - num_prefix
    new_grid = grid or square_grid(new_tokens, 'model pos_embedding')
    try:
      resized = resize_posemb(
        loaded[posemb],
        new_grid,
        num_prefix=num_prefix,
        old_grid=pretrained_grid,
        method=resize_method,
      )
    except CheckpointError as e:
      raise CheckpointError(f'{source}: {e}') from e
    log(
      f'resized {posemb} {np.shape(loaded[posemb])} → {resized.shape} '
      f'({resize_method}).'
    )
    loaded = {**loaded, posemb: resized}
  return loaded
