"""vit_jax's model configs: `from vit_jax.configs import models`.

The models Google published (the basenames of gs://vit_models files, plus
the 'testing' pair), under vit_jax's names: `MODEL_CONFIGS['ViT-B_16']` and
`get_b16_config()`. Every config is the one of `vit_jax.models.registry`,
which also holds this project's other models (ViT-Mini, Swin, ResNet, ...);
`vit_jax.models.MODEL_CONFIGS` has them all.
"""

from typing import Dict

import ml_collections

from vit_jax.models import registry

# vit_jax's `get_<name>_config` functions, those of the registry.
get_testing_config = registry.get_testing_config
get_testing_unpooled_config = registry.get_testing_unpooled_config
get_ti16_config = registry.get_ti16_config
get_s16_config = registry.get_s16_config
get_b16_config = registry.get_b16_config
get_l16_config = registry.get_l16_config
get_h14_config = registry.get_h14_config
get_s16_gap_norep_config = registry.get_s16_gap_norep_config
get_b16_gap_norep_config = registry.get_b16_gap_norep_config
get_b8_config = registry.get_b8_config
get_s32_config = registry.get_s32_config
get_b32_config = registry.get_b32_config
get_l32_config = registry.get_l32_config
get_s32_gap_norep_config = registry.get_s32_gap_norep_config
get_b32_gap_norep_config = registry.get_b32_gap_norep_config
get_r_ti16_config = registry.get_r_ti16_config
get_r50_b16_config = registry.get_r50_b16_config
get_r26_b32_config = registry.get_r26_b32_config
get_r26_s32_config = registry.get_r26_s32_config
get_r50_l32_config = registry.get_r50_l32_config
get_mixer_b16_config = registry.get_mixer_b16_config
get_mixer_b32_config = registry.get_mixer_b32_config
get_mixer_l16_config = registry.get_mixer_l16_config

# The names vit_jax publishes (its LiT image-text models aside).
PUBLISHED_NAMES = (
  'testing',
  'testing-unpooled',
  'ViT-Ti_16',
  'ViT-S_16',
  'ViT-B_16',
  'ViT-L_16',
  'ViT-H_14',
  'ViT-S_16-gap-norep',
  'ViT-B_16-gap-norep',
  'ViT-B_8',
  'ViT-S_32',
  'ViT-B_32',
  'ViT-L_32',
  'ViT-S_32-gap-norep',
  'ViT-B_32-gap-norep',
  'R+ViT-Ti_16',
  'R50+ViT-B_16',
  'R26+ViT-B_32',
  'R26+ViT-S_32',
  'R50+ViT-L_32',
  'Mixer-B_16',
  'Mixer-B_32',
  'Mixer-L_16',
)

# The registry's locked configs of `PUBLISHED_NAMES`, as in vit_jax.
MODEL_CONFIGS: Dict[str, ml_collections.ConfigDict] = {
  name: registry.MODEL_CONFIGS[name] for name in PUBLISHED_NAMES
}
