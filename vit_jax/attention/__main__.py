"""Attention maps of image files as PNGs.

  python -m vit_jax.attention --config=configs/scratch.py:mnist5k \\
      --checkpoint=model.npz --image=a.png --image=b.jpg --out=/tmp/maps
  python -m vit_jax.attention --checkpoint=upstream.npz \\
      --task=runs/digits_ia3/task_params.npz --image=a.png --out=/tmp/maps

For each image, `OUT/<name>_rollout.png` (the image and its attention
rollout) and `OUT/<name>_heads.png` (every layer's per-head maps). The
checkpoint is any file `vit_jax.checkpoint` reads, with the model of
`--config` (its crop is the image size); with `--task` the model, crop and
fine-tuned parameters come from the task file instead.
"""

import os
from typing import Any, List, Sequence, Tuple

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np
from ml_collections import config_flags

from vit_jax import checkpoint
from vit_jax import input_pipeline
from vit_jax import models
from vit_jax.attention import maps
from vit_jax.attention import render
from vit_jax.finetune import serving

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config (model and pp.crop); not needed with '
    '--task.', lock_config=True)
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Model or base '
                                  'checkpoint (.npz, .safetensors).')
_TASK = flags.DEFINE_string('task', None, 'A task file of a fine-tuning run '
                            'on --checkpoint.')
_IMAGES = flags.DEFINE_multi_string('image', [], 'JPEG/PNG files, any size.')
_OUT = flags.DEFINE_string('out', None, 'Directory for the PNGs.')
_FUSION = flags.DEFINE_enum('head_fusion', 'mean', list(maps.HEAD_FUSIONS),
                            'How rollout combines each layer\'s heads.')


def model_from_checkpoint(config: ml_collections.ConfigDict,
                          path: str) -> Tuple[Any, Any]:
  """`config.model` with the checkpoint's head size, and its parameters
  adapted to `config.pp.crop` (position embeddings resized if needed)."""
  heads = (config.model.get('transformer') or {}).get('num_heads')
  ckpt = checkpoint.read(path, num_heads=heads)
  head = ckpt.params.get('head', {}).get('kernel')
  model_config = {**config.model.to_dict(), **ckpt.model_options}
  model = models.build_model(
      model_config, num_classes=None if head is None else head.shape[-1])
  crop = config.pp.crop
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), np.zeros([1, crop, crop, 3], np.float32),
      train=False)['params'])
  params = checkpoint.load_pretrained(
      pretrained_path=ckpt, model_config=model_config, reset_head=False,
      init_params=jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes))
  return model, params


def write_pngs(model: Any, params: Any, image_paths: Sequence[str], crop: int,
               out_dir: str, head_fusion: str = 'mean') -> List[str]:
  """Writes each image's rollout and per-head PNGs; returns their paths."""
  images = input_pipeline.read_images(
      image_paths, ml_collections.ConfigDict({'crop': crop}))
  weights = maps.attention_weights(model, params, images)
  grid = maps.patch_grid(model, (crop, crop))
  heat = maps.token_map(maps.rollout(weights, head_fusion), model.classifier,
                        grid)
  per_head = maps.token_map(weights, model.classifier, grid)
  os.makedirs(out_dir, exist_ok=True)
  written = []
  for index, path in enumerate(image_paths):
    name = os.path.splitext(os.path.basename(path))[0]
    rollout_path = os.path.join(out_dir, f'{name}_rollout.png')
    render.overlay_png(rollout_path, images[index], np.asarray(heat[index]),
                       f'rollout ({head_fusion} of heads)')
    heads_path = os.path.join(out_dir, f'{name}_heads.png')
    render.heads_png(heads_path, np.asarray(per_head[:, index]),
                     f'{name}: attention per layer and head')
    written += [rollout_path, heads_path]
  return written


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not _IMAGES.value:
    raise app.UsageError('Give at least one --image.')
  if _TASK.value:
    task, = serving.load_tasks(_CHECKPOINT.value, [_TASK.value]).values()
    model, params, crop = task.model, task.params, task.crop
  elif _CONFIG.value is None:
    raise app.UsageError('Give --config (the model of --checkpoint) or --task.')
  else:
    model, params = model_from_checkpoint(_CONFIG.value, _CHECKPOINT.value)
    crop = _CONFIG.value.pp.crop
  for path in write_pngs(model, params, _IMAGES.value, crop, _OUT.value,
                         _FUSION.value):
    print(path)


if __name__ == '__main__':
  flags.mark_flags_as_required(['checkpoint', 'out'])
  app.run(main)
