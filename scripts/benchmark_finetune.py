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
import statistics
import time
from typing import Dict, List

import jax
import numpy as np

from configs import common
from vit_jax import models
from vit_jax.finetune import labels as labels_lib
from vit_jax.train import step as step_lib
from vit_jax.train import trainer

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


def make_runner(name: str, model: str, crop: int, batch: int):
  """A function running one train step of mode `name`; its trainable count."""
  mode, head, method = MODES[name]
  config = common.with_dataset(common.get_config(), 'cifar10')
  config.model = models.MODEL_CONFIGS[model].copy_and_resolve_references()
  config.update({'batch': batch, 'accum_steps': 1})
  config.pp.crop = crop
  config.finetune.mode = mode
  config.finetune.head.type = head
  config.finetune.injection.method = method
  setup = trainer.create_setup(config, num_classes=10)
  device = jax.local_devices()[:1]
  step = step_lib.data_parallel(
      step_lib.make_train_step(setup.model, setup.optimizer, setup.schedule,
                               labels=setup.labels),
      donate_state=True, devices=device)
  rng = np.random.default_rng(0)
  batch_arrays = step_lib.replicate({
      'image': rng.uniform(-1, 1, [batch, crop, crop, 3]).astype(np.float32),
      'label': rng.integers(0, 10, [batch]).astype(np.int32)}, device)
  holder = {'state': step_lib.replicate(setup.state, device)}

  def run():
    holder['state'], metrics = step(holder['state'], batch_arrays)
    jax.block_until_ready(metrics)

  return run, labels_lib.count(setup.state.params, setup.labels)


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
  runners, trainable = {}, {}
  for name in names:
    runners[name], trainable[name] = make_runner(name, args.model, args.crop,
                                                 args.batch)
    for _ in range(2):  # Compile, then one untimed step.
      runners[name]()
  times: Dict[str, List[float]] = {name: [] for name in names}
  for _ in range(args.rounds):
    for name in names:
      start = time.perf_counter()
      runners[name]()
      times[name].append(time.perf_counter() - start)
  medians = {name: statistics.median(t) for name, t in times.items()}
  reference = medians.get('full')
  print(f'{"mode":12} {"trainable":>10} {"s/step":>7} {"img/s":>6} '
        f'{"vs full":>7}')
  for name in names:
    ratio = f'{medians[name] / reference:7.2f}' if reference else '      -'
    print(f'{name:12} {trainable[name]:10,d} {medians[name]:7.3f} '
          f'{args.batch / medians[name]:6.1f} {ratio}')


if __name__ == '__main__':
  main()
