"""vit_jax's config of the `inference_time` job (`vit_jax.inference_time`).

  python -m vit_jax.main --config=configs/inference_time.py --workdir=DIR \
      --config.model_name=ViT-B_16 --config.batch=64 \
      --config.image_size=224 --config.num_classes=1000

`batch`, `num_classes` and `image_size` have no default (0) and must be set.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  """Returns the settings of one timing, with vit_jax's keys and defaults."""
  config = ml_collections.ConfigDict()
  # A model of `vit_jax.models.MODEL_CONFIGS`.
  config.model_name = 'ViT-B_32'
  # Timed calls of the forward pass, after `initial_steps` untimed ones.
  config.steps = 30
  config.initial_steps = 10
  # Images per call, over all local devices.
  config.batch = 0
  # The size of the model's head.
  config.num_classes = 0
  # The side of the square images.
  config.image_size = 0
  # Directory of `{model_name}.npz`, loaded first; None: random weights
  # (which time the same).
  config.pretrained_dir = config_dict.placeholder(str)
  # The model's compute dtype: 'float32' or 'bfloat16'.
  config.dtype = 'float32'
  # The job `vit_jax.main` runs.
  config.trainer = 'inference_time'
  return config
