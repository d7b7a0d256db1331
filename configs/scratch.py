"""Train a small ViT from scratch on an embedded data set (no download).

`--config=configs/scratch.py:DATASET[,MODEL]`: DATASET is `mnist5k` or
`digits`; MODEL a registry short name (default: mini7 for mnist5k, micro4 for digits;
resnet_mini and resnet_micro are ResNet baselines of their sizes).

  python -m vit_jax.main --config=configs/scratch.py:mnist5k --workdir=/tmp/mnist5k
"""

from configs import common
from vit_jax.models import registry

# dataset: (model, crop, pad of the random shift, steps)
SETUPS = {
  'mnist5k': ('mini7', 28, 2, 800),
  'digits': ('micro4', 16, 2, 600),
}


def get_config(arg: str = 'mnist5k'):
  """Returns the from-scratch config for 'DATASET[,MODEL]'."""
  dataset, _, model = arg.partition(',')
  if dataset not in SETUPS:
    raise ValueError(
      f'configs/scratch.py trains on {sorted(SETUPS)}, got {dataset!r}.'
    )
  default_model, crop, pad, steps = SETUPS[dataset]
  config = common.with_dataset(common.get_config(), dataset)
  config.model = registry.get_config(model or default_model)
  config.pp.update({'crop': crop, 'pad': pad})
  config.total_steps = steps
  config.optimizer = 'adamw'
  config.optim_dtype = 'float32'
  config.base_lr = 1e-3
  config.weight_decay = 0.05
  # A sixteenth of the steps (50 of 800), following --config.total_steps
  # unless --config.warmup_steps is given.
  config.warmup_steps = config.get_ref('total_steps') // 16
  config.label_smoothing = 0.1
  config.batch = 128
  config.batch_eval = 256
  config.accum_steps = 1
  config.shuffle_buffer = 5_000
  config.eval_every = 200
  config.progress_every = 50
  config.checkpoint_every = 200
  return config
