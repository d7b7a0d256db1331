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

from absl import app
from absl import flags
from ml_collections import config_flags

from vit_jax import cli
from vit_jax.attention import maps
from vit_jax.attention import render
from vit_jax.checkpoint import pretrained
from vit_jax.finetune import serving

_CONFIG = config_flags.DEFINE_config_file(
  'config',
  None,
  'Experiment config (model and pp.crop); not needed with --task.',
  lock_config=True,
)
_CHECKPOINT = flags.DEFINE_string(
  'checkpoint', None, 'Model or base checkpoint (.npz, .safetensors).'
)
_TASK = flags.DEFINE_string(
  'task', None, 'A task file of a fine-tuning run on --checkpoint.'
)
_IMAGES = flags.DEFINE_multi_string('image', [], 'JPEG/PNG files, any size.')
_OUT = flags.DEFINE_string('out', None, 'Directory for the PNGs.')
_FUSION = flags.DEFINE_enum(
  'head_fusion',
  'mean',
  list(maps.HEAD_FUSIONS),
  "How rollout combines each layer's heads.",
)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not _IMAGES.value:
    raise app.UsageError('Give at least one --image.')
  if _TASK.value:
    (task,) = serving.load_tasks(_CHECKPOINT.value, [_TASK.value]).values()
    model, params, crop = task.model, task.params, task.crop
  elif _CONFIG.value is None:
    raise app.UsageError('Give --config (the model of --checkpoint) or --task.')
  else:
    model, params = pretrained.model_from_checkpoint(
      _CONFIG.value.model, _CHECKPOINT.value, _CONFIG.value.pp.crop
    )
    crop = _CONFIG.value.pp.crop
  for path in render.write_pngs(
    model, params, _IMAGES.value, crop, _OUT.value, _FUSION.value
  ):
    print(path)


if __name__ == '__main__':
  flags.mark_flags_as_required(['checkpoint', 'out'])
  cli.run(main)
