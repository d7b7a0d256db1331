"""Fine-tune a published ViT: `--config=configs/vit.py:MODEL,DATASET`.

MODEL is a short name from `vit_jax.models.registry` (ti16, s16, b16, l16,
h14, b8, s32, b32, l32, r_ti16, r50_b16, r26_s32, r26_b32, r50_l32, ...);
DATASET is a preset of `configs/common.py` or any tfds name / image folder.

  python -m vit_jax.main --config=configs/vit.py:b16,cifar10 \
      --workdir=/tmp/vit --config.pretrained_dir=DIR

The pretrained checkpoint is `DIR/MODEL_NAME.npz` (default DIR: `.`, as in
vit_jax); without it the run stops, unless `--config.pretrained_dir=` asks
for training from scratch.
"""

from configs import common
from vit_jax.models import registry


def get_config(model_dataset: str = 'b16,cifar10'):
  """Returns the config for fine-tuning MODEL on DATASET ('MODEL,DATASET')."""
  model, sep, dataset = model_dataset.partition(',')
  if not sep or not model or not dataset:
    raise ValueError(
      f'configs/vit.py expects MODEL,DATASET (e.g. b16,cifar10), got '
      f'{model_dataset!r}.'
    )
  config = common.with_dataset(common.get_config(), dataset)
  config.model = registry.get_config(model)
  # vit_jax's default: fine-tune ./MODEL_NAME.npz. A missing file stops the
  # run; `--config.pretrained_dir=` (empty) trains from scratch instead.
  config.pretrained_dir = '.'
  patches = config.model.get('patches') or {}
  side = (patches.get('size') or (1,))[0]
  if config.model.get('resnet') is None and config.pp.crop % side:
    # The presets' 384 under /14 patches would leave pixels no patch
    # covers: the next crop the patches tile (392, 28 x 28, for /14).
    config.pp.crop += side - config.pp.crop % side
  if (model, dataset) == ('b16', 'cifar10'):
    config.base_lr = 0.01  # vit_jax's tuned value for this pair.
  return config
