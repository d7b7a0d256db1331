"""Train-step time of each fine-tuning mode as a ratio of full fine-tuning.

Builds the trainer's own step (`vit_jax.train.step`, SGD with momentum and
clipping as `configs/common.py` sets them) for every mode on the same model
and batch, then times them in alternation (full, head, ..., full, head, ...)
so that the machine's load drifts affect all alike, and prints the median
seconds per step and its ratio to the full step. Frozen weights get no
gradient (the step differentiates only the trainable leaves), so head-only
training costs about a forward pass and injection about a forward pass plus
the backward pass through activations.

  python scripts/benchmark_finetune.py [--model ViT-Ti_16] [--crop 224] \
      [--batch 32] [--rounds 5]
"""

import argparse
import jax

from configs import common
from vit_jax import models
from vit_jax.train import timing

# name: (mode, head type, injection method)
MODES = {
    'full': ('full', 'linear', 'ia3'),
    'head': ('head', 'linear', 'ia3'),
    'head (mlp)': ('head', 'mlp', 'ia3'),
    'ia3': ('injection', 'linear', 'ia3'),
    'ssf': ('injection', 'linear', 'ssf'),
    'lora': ('injection', 'linear', 'lora'),
    'bitfit': ('injection', 'linear', 'bitfit'),
}


def mode_config(name: str, model: str, crop: int, batch: int):
  """The trainer's config for fine-tuning mode `name` (CIFAR-10 settings)."""
  mode, head, method = MODES[name]
  config = common.with_dataset(common.get_config(), 'cifar10')
  config.model = models.MODEL_CONFIGS[model].copy_and_resolve_references()
  config.update({'batch': batch, 'accum_steps': 1})
  config.pp.crop = crop
  config.finetune.mode = mode
  config.finetune.head.type = head
  config.finetune.injection.method = method
  return config


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='ViT-Ti_16')
  parser.add_argument('--crop', type=int, default=224)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--rounds', type=int, default=5,
                      help='timed steps per mode, alternating modes')
  parser.add_argument('--modes', default=','.join(MODES))
  args = parser.parse_args()
  names = args.modes.split(',')
  print(f'JAX {jax.__version__} on {jax.devices()[0].device_kind}: '
        f'{args.model} at {args.crop}, batch {args.batch}, train step '
        f'(SGD momentum, clipping), median of {args.rounds} alternating rounds')
  device = jax.local_devices()[:1]
  workloads, trainable = {}, {}
  for name in names:
    config = mode_config(name, args.model, args.crop, args.batch)
    workloads[name] = timing.train_workload(config, 10, device)
    trainable[name] = workloads[name].trainable_params
  seconds = timing.time_rounds({n: w.run for n, w in workloads.items()},
                               args.rounds)
  medians = {name: timing.median(t) for name, t in seconds.items()}
  reference = medians.get('full')
  print(f'{"mode":12} {"trainable":>10} {"s/step":>7} {"img/s":>6} '
        f'{"vs full":>7}')
  for name in names:
    ratio = f'{medians[name] / reference:7.2f}' if reference else '      -'
    print(f'{name:12} {trainable[name]:10,d} {medians[name]:7.3f} '
          f'{args.batch / medians[name]:6.1f} {ratio}')


if __name__ == '__main__':
  main()
