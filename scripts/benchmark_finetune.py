"""Train-step time of each fine-tuning mode as a ratio of full fine-tuning.

Builds the trainer's own step (`vit_jax.steps`, SGD with momentum and
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
import statistics

from benchmark import experiment_config
import jax

from vit_jax.benchmarks import timing
from vit_jax.finetune import modes


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='ViT-Ti_16')
  parser.add_argument('--crop', type=int, default=224)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument(
    '--rounds',
    type=int,
    default=5,
    help='timed steps per mode, alternating modes',
  )
  parser.add_argument('--modes', default=','.join(modes.presets()))
  args = parser.parse_args()
  names = args.modes.split(',')
  print(
    f'JAX {jax.__version__} on {jax.devices()[0].device_kind}: '
    f'{args.model} at {args.crop}, batch {args.batch}, train step '
    f'(SGD momentum, clipping), median of {args.rounds} alternating rounds'
  )
  device = jax.local_devices()[:1]
  workloads, trainable = {}, {}
  for name in names:
    config = experiment_config(args.model, args.crop, args.batch, finetune=name)
    workloads[name] = timing.train_workload(config, 10, device)
    trainable[name] = workloads[name].trainable_params
  seconds = timing.time_rounds(
    {n: w.run for n, w in workloads.items()}, args.rounds
  )
  medians = {name: statistics.median(t) for name, t in seconds.items()}
  reference = medians.get('full')
  print(
    f'{"mode":12} {"trainable":>10} {"s/step":>7} {"img/s":>6} {"vs full":>7}'
  )
  for name in names:
    ratio = f'{medians[name] / reference:7.2f}' if reference else '      -'
    print(
      f'{name:12} {trainable[name]:10,d} {medians[name]:7.3f} '
      f'{args.batch / medians[name]:6.1f} {ratio}'
    )


if __name__ == '__main__':
  main()
