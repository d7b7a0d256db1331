"""Fine-tune an AugReg checkpoint ("How to train your ViT?"), as vit_jax's
`configs/augreg.py`: `--config=configs/augreg.py:MODEL_OR_FILENAME,DATASET`.

MODEL_OR_FILENAME is an AugReg model name (`Ti_16`, `S_16`, `B_16`, `L_16`,
`S_32`, `B_32`, `B_8`, `R_Ti_16`, `R26_S_32`, `R26_B_32`, `R50_L_32`), which
selects the ImageNet-21k pre-training with the best final validation
accuracy in `config.pretrained_dir`/index.csv, or a full filename without
`.npz`. DATASET is a preset of `configs/common.py`, a tfds name or an
image folder (vit_jax instead takes `--config.dataset`).

  python -m vit_jax.main --config=configs/augreg.py:R_Ti_16,oxford_iiit_pet \
      --workdir=/tmp/augreg --config.base_lr=0.01
  python -m vit_jax.main --workdir=/tmp/augreg --config=configs/augreg.py:\
R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0,oxford_iiit_pet
"""

from configs import common
from vit_jax import models
from vit_jax.checkpoint import augreg


def get_config(arg: str = 'B_16,cifar10'):
  """Returns the config for 'MODEL_OR_FILENAME,DATASET'."""
  model_or_filename, sep, dataset = arg.rpartition(',')
  if not sep or not model_or_filename or not dataset:
    raise ValueError(
      f'configs/augreg.py expects MODEL_OR_FILENAME,DATASET (e.g. '
      f'B_16,cifar10), got {arg!r}.'
    )
  config = common.with_dataset(common.get_config(), dataset)
  name = augreg.model_name(model_or_filename)
  config.model = models.MODEL_CONFIGS[name].copy_and_resolve_references()
  config.model.transformer.dropout_rate = 0.0  # No AugReg when fine-tuning.
  config.pretrained_dir = augreg.DEFAULT_DIR
  config.model_or_filename = model_or_filename
  # vit_jax's values for AugReg fine-tuning, often overridden.
  config.base_lr = 0.03
  config.total_steps = 500
  config.warmup_steps = 100
  return config
