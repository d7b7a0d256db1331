"""Train a small ViT from scratch on an embedded data set (no download).

`--config=configs/scratch.py:DATASET[,MODEL]`: DATASET is `mnist5k` or
`digits`; MODEL a registry short name (default: mini_c3 for mnist5k,
micro4 for digits; resnet_mini and resnet_micro are ResNet baselines).

  python -m vit_jax.main --config=configs/scratch.py:mnist5k --workdir=/tmp/mnist5k

The mnist5k recipe was chosen on a held-out slice of the training split by
`scripts/sweep_scratch.py` (docs/training.md#the-from-scratch-recipe); it
scores each test image by the mean softmax over its 9 copies shifted by up
to 1 px (`eval_shift=1`) and reports the one-view accuracy beside.
"""

from configs import common
from vit_jax.models import registry

# What each data set sets; the rest is common to both.
SETUPS = {
  'mnist5k': {
    'model': 'mini_c3',
    'total_steps': 2000,
    'base_lr': 2e-3,
    'weight_decay': 0.5,
    'eval_shift': 1,
    'pp': {
      'crop': 28,
      'augment': 'affine',
      'pad': 2,
      'rotate': 15.0,
      'scale': 0.15,
      'shear': 10.0,
    },
  },
  'digits': {
    'model': 'micro4',
    'total_steps': 600,
    'base_lr': 1e-3,
    'weight_decay': 0.05,
    'eval_shift': 0,
    'pp': {'crop': 16, 'augment': 'pad_and_crop', 'pad': 2},
  },
}


def get_config(arg: str = 'mnist5k'):
  """Returns the from-scratch config for 'DATASET[,MODEL]'."""
  dataset, _, model = arg.partition(',')
  if dataset not in SETUPS:
    raise ValueError(
      f'configs/scratch.py trains on {sorted(SETUPS)}, got {dataset!r}.'
    )
  setup = SETUPS[dataset]
  config = common.with_dataset(common.get_config(), dataset)
  config.model = registry.get_config(model or setup['model'])
  config.pp.update(setup['pp'])
  config.total_steps = setup['total_steps']
  config.base_lr = setup['base_lr']
  config.optimizer = 'adamw'
  config.optim_dtype = 'float32'
  config.weight_decay = setup['weight_decay']
  # A sixteenth of the steps, following --config.total_steps unless
  # --config.warmup_steps is given.
  config.warmup_steps = config.get_ref('total_steps') // 16
  config.label_smoothing = 0.1
  config.eval_shift = setup['eval_shift']
  config.batch = 128
  config.batch_eval = 256
  config.accum_steps = 1
  config.shuffle_buffer = 5_000
  # Evaluated once, at the end (a run of a few minutes).
  config.eval_every = 0
  config.progress_every = 100
  config.checkpoint_every = 500
  return config
