"""Fine-tune Mixer-B/16 on CIFAR-10 at 224x224, as vit_jax's config does.

  python -m vit_jax.main --config=configs/mixer_base16_cifar10.py \
      --workdir=/tmp/mixer --config.pretrained_dir=DIR
"""

from configs import common
from vit_jax.models import registry


def get_config():
  """Returns the Mixer-B/16 CIFAR-10 fine-tuning config."""
  config = common.with_dataset(common.get_config(), 'cifar10')
  config.model = registry.get_mixer_b16_config()
  config.pp.crop = 224
  return config
