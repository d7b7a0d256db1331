"""PNG figures of attention maps (matplotlib, no display needed).

`write_pngs(model, params, image_files, crop, out_dir)` writes each image's
rollout overlay and per-head grid; `overlay_png` and `heads_png` draw one
figure from arrays.

Sizes are fixed in pixels (`DPI` × the figure size in inches), so a figure of
N layers × H heads always has the same shape, and files are written
atomically (temporary file, then rename).
"""

import io
import os
from typing import Any, List, Sequence

import matplotlib

matplotlib.use('Agg')
# pylint: disable=g-import-not-at-top,wrong-import-position
import matplotlib.pyplot as plt
import numpy as np

from vit_jax import input_pipeline
from vit_jax import paths
from vit_jax.attention import maps

DPI = 100
PANEL_INCHES = 3.0  # Overlay panels.
HEAD_INCHES = 1.5  # Each per-head panel.


def _to_unit(image: np.ndarray) -> np.ndarray:
  """A model input in [-1, 1] as an RGB image in [0, 1]."""
  return np.clip((np.asarray(image, np.float32) + 1.0) / 2.0, 0.0, 1.0)


def upsample(heat: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """A `[rows, cols]` map repeated to `size` pixels, scaled to [0, 1]."""
  heat = np.asarray(heat, np.float32)
  heat = np.kron(
    heat,
    np.ones((size[0] // heat.shape[0], size[1] // heat.shape[1]), np.float32),
  )
  low, high = heat.min(), heat.max()
  return (heat - low) / (high - low) if high > low else np.zeros_like(heat)


def _save(fig, path: str) -> None:
  """Writes `fig` as a PNG to `path` (local or gs://), atomically."""
  buffer = io.BytesIO()
  fig.savefig(buffer, dpi=DPI, format='png')
  plt.close(fig)
  paths.write_bytes(path, buffer.getvalue())


def overlay_png(
  path: str, image: np.ndarray, heat: np.ndarray, title: str
) -> None:
  """The image, and the image with `heat` (patch grid) overlaid.

  `2 * PANEL_INCHES * DPI` × `PANEL_INCHES * DPI` pixels.
  """
  fig, (left, right) = plt.subplots(
    1, 2, figsize=(2 * PANEL_INCHES, PANEL_INCHES)
  )
  picture = _to_unit(image)
  left.imshow(picture)
  left.set_title('input', fontsize=9)
  right.imshow(picture)
  right.imshow(upsample(heat, picture.shape[:2]), cmap='inferno', alpha=0.6)
  right.set_title(title, fontsize=9)
  for axis in (left, right):
    axis.axis('off')
  _save(fig, path)


def heads_png(path: str, maps: np.ndarray, title: str) -> None:
  """A grid of per-head maps `[layers, heads, rows, cols]`, one row a layer.

  `heads * HEAD_INCHES * DPI` × `layers * HEAD_INCHES * DPI` pixels; each
  panel is titled with its layer and head, each normalised on its own.
  """
  layers, heads = maps.shape[:2]
  fig, axes = plt.subplots(
    layers,
    heads,
    squeeze=False,
    figsize=(heads * HEAD_INCHES, layers * HEAD_INCHES),
  )
  for layer in range(layers):
    for head in range(heads):
      axis = axes[layer, head]
      axis.imshow(np.asarray(maps[layer, head]), cmap='inferno')
      axis.set_title(f'layer {layer} head {head}', fontsize=7)
      axis.axis('off')
  fig.suptitle(title, fontsize=9)
  _save(fig, path)


def write_pngs(
  model: Any,
  params: Any,
  image_paths: Sequence[str],
  crop: int,
  out_dir: str,
  head_fusion: str = 'mean',
) -> List[str]:
  """Writes each image's rollout and per-head PNGs; returns their paths.

  Raises ConfigError (before reading any image) for a model without maps
  (`maps.check_supported`).
  """
  maps.check_supported(model)
  images = input_pipeline.read_images(image_paths, crop)
  weights = maps.attention_weights(model, params, images)
  grid = maps.patch_grid(model, (crop, crop))
  heat = maps.token_map(
    maps.rollout(weights, head_fusion), model.classifier, grid
  )
  per_head = maps.token_map(weights, model.classifier, grid)
  paths.makedirs(out_dir)
  written = []
  for index, path in enumerate(image_paths):
    name = os.path.splitext(paths.name(path))[0]
    rollout_path = paths.join(out_dir, f'{name}_rollout.png')
    overlay_png(
      rollout_path,
      images[index],
      np.asarray(heat[index]),
      f'rollout ({head_fusion} of heads)',
    )
    heads_path = paths.join(out_dir, f'{name}_heads.png')
    heads_png(
      heads_path,
      np.asarray(per_head[:, index]),
      f'{name}: attention per layer and head',
    )
    written += [rollout_path, heads_path]
  return written
