"""Publishing a trained run as a self-describing folder (e.g. a Hub repository).

  python -m vit_jax.publish --workdir=/tmp/vit_mnist5k \\
      --out=/tmp/vit_mnist5k_model [--base=upstream.npz]
  publish.publish('/tmp/vit_mnist5k', '/tmp/vit_mnist5k_model')

reads the run's `results.json` and task file (with its base checkpoint when
it has one; by default the one the run recorded) and writes:

  model.safetensors  timm's names: `timm.create_model('local-dir:FOLDER',
                     pretrained=True)`, or `hf-hub:USER/REPO` once uploaded
  model.npz          Google's names: vit_jax, big_vision, timm's npz loader
  config.json        timm's Hub config (architecture, model_args, input
                     preprocessing, label names) plus a `vit_jax` section
                     (model config, crop, classes, fine-tuning)
  class_names.txt    one per line, in output order
  results.json       the run's results, as the trainer wrote them
  README.md          a model card generated from all of the above

Injected fine-tuning methods are folded into the weights, and fixed
position embeddings (sincos2d, none) are written as the learned table with
the same values, so both files are plain ViTs that compute the run's
function. Models timm's ViT cannot hold (hybrids, pre_logits, MLP heads,
per-token classifiers, other LayerNorm epsilons) get no safetensors file;
the card says why. Nothing here touches the network.
"""

import argparse
import json
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import ml_collections
import numpy as np

from vit_jax import checkpoint
from vit_jax import cli
from vit_jax import models
from vit_jax import paths
from vit_jax import results as results_lib
from vit_jax import views
from vit_jax.errors import CheckpointError
from vit_jax.errors import ConfigError
from vit_jax.finetune import serving
from vit_jax.models import table
from vit_jax.models import vit

CONFIG_FILE = 'config.json'
NPZ_FILE = 'model.npz'
SAFETENSORS_FILE = 'model.safetensors'
CLASS_NAMES_FILE = 'class_names.txt'
CARD_FILE = 'README.md'
# vit_jax's evaluation input: RGB resized to the crop, scaled to [-1, 1].
MEAN = STD = (0.5, 0.5, 0.5)
TIMM_ARCHITECTURE = 'vit_base_patch16_224'  # model_args set every dimension.
TIMM_EPSILON = 1e-6


def _read_results(workdir: str) -> Dict[str, Any]:
  results = results_lib.finished_results(workdir)
  if results is None:
    raise ConfigError(
      f'{paths.join(workdir, results_lib.RESULTS_FILE)}: no such file; '
      f'{workdir} is not the workdir of a finished run of python -m '
      'vit_jax.main.'
    )
  return results


def _task_path(workdir: str, results: Mapping[str, Any]) -> str:
  """The task file of the run in `workdir`; a ConfigError if there is none,
  or if its contents are not those `results.json` recorded (the training
  was interrupted between the two writes, or one was replaced)."""
  path = results_lib.task_file_path(workdir, results)
  if not path:
    raise ConfigError(
      f'The run in {workdir} wrote no task file '
      "(config.finetune.task_file=''); train with the default "
      "'task_params.npz' to publish it."
    )
  results_path = paths.join(workdir, results_lib.RESULTS_FILE)
  if not paths.exists(path):
    raise ConfigError(
      f'{path}: no such file, but {results_path} names it; the workdir is '
      'incomplete. Run the training command again with this --workdir to '
      'write it.'
    )
  recorded = results.get('task_file_sha256')
  if recorded and paths.sha256(path) != recorded:
    raise ConfigError(
      f'{path} is not the task file {results_path} describes (its SHA-256 '
      'differs from the recorded one): the run was interrupted between the '
      'two writes, or one of them was replaced. Run the training command '
      'again with this --workdir to rewrite both.'
    )
  return path


def plain_vit(
  model_config: Mapping[str, Any], params: Any, crop: int
) -> Tuple[Dict[str, Any], Any]:
  """The model config and params with a fixed position embedding written
  as the equivalent learned table (timm's and Google's files need one)."""
  model_config = json.loads(json.dumps(model_config))
  posemb = model_config.get('posemb', 'learned')
  if posemb == 'learned':
    return model_config, params
  table_values = vit.fixed_position_table(
    posemb,
    vit.token_grid(
      (crop, crop), model_config['patches'], model_config.get('conv_stem')
    ),
    int('cls' in params),
    model_config['hidden_size'],
  )
  params = dict(params)
  params['Transformer'] = {
    **params['Transformer'],
    'posembed_input': {'pos_embedding': table_values},
  }
  model_config['posemb'] = 'learned'
  return model_config, params


def timm_config(
  model_config: Mapping[str, Any],
  params: Mapping[str, Any],
  crop: int,
  class_names: Tuple[str, ...],
) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
  """timm's Hub `config.json` for the model, or (None, why not)."""
  cls = models.model_class(model_config.get('model_name') or '')
  if cls is not models.VisionTransformer:
    return None, (
      f'the {cls.__name__} architecture: only ViTs are '
      "published with timm's config here"
    )
  if model_config.get('resnet'):
    return None, "a hybrid (ResNet root): timm's ViT has no slot for it"
  if model_config.get('conv_stem'):
    return None, "a convolutional stem: timm's ViT has no slot for it"
  if model_config.get('representation_size'):
    return None, "a pre_logits layer: timm's ViT has no slot for it"
  if 'kernel' not in params['head']:
    return None, "an MLP head: timm's ViT has a linear head"
  num_classes = int(params['head']['kernel'].shape[-1])
  classifier = model_config.get('classifier', 'token')
  if classifier not in ('token', 'gap'):
    return None, f'classifier={classifier!r}: timm pools to one vector'
  epsilon = model_config.get('layernorm_epsilon', TIMM_EPSILON)
  if epsilon != TIMM_EPSILON:
    return None, f"LayerNorm epsilon {epsilon}: timm's ViT uses 1e-6"
  patch = model_config['patches']['size']
  if patch[0] != patch[1]:
    return None, f'non-square patches {patch}'
  hidden = model_config['hidden_size']
  transformer = model_config['transformer']
  pool = 'token' if classifier == 'token' else 'avg'
  model_args = {
    'img_size': crop,
    'patch_size': patch[0],
    'embed_dim': hidden,
    'depth': transformer['num_layers'],
    'num_heads': transformer['num_heads'],
    'mlp_ratio': transformer['mlp_dim'] / hidden,
    'class_token': classifier == 'token',
    'global_pool': pool,
    'fc_norm': False,
    'num_classes': num_classes,
    'act_layer': (
      'gelu_tanh' if model_config.get('approximate_gelu', True) else 'gelu'
    ),
  }
  pretrained_cfg = {
    'input_size': [3, crop, crop],
    'interpolation': 'bilinear',
    'crop_pct': 1.0,
    'crop_mode': 'center',
    'mean': list(MEAN),
    'std': list(STD),
    'num_classes': num_classes,
    'fixed_input_size': True,
  }
  config = {
    'architecture': TIMM_ARCHITECTURE,
    'num_classes': num_classes,
    'num_features': hidden,
    'global_pool': pool,
    'model_args': model_args,
    'pretrained_cfg': pretrained_cfg,
  }
  if class_names:
    config['label_names'] = list(class_names)
  return config, None


def read_summary(folder: str) -> Dict[str, Any]:
  """The `vit_jax` section of a published folder's config.json: the model
  config, crop, class names and what the run was."""
  path = paths.join(folder, CONFIG_FILE)
  if not paths.exists(path):
    raise CheckpointError(
      f'{path}: no such file; {folder} is not a folder written by '
      '`python -m vit_jax.publish`.'
    )
  return paths.read_json(path)['vit_jax']


def _describe_model(
  model_config: Mapping[str, Any], crop: int, num_classes: int
) -> Dict[str, Any]:
  """Parameters and forward GFLOPs per image, from shapes alone."""
  model = models.build_model(model_config, num_classes=num_classes)
  variables = table.abstract_variables(model, crop)
  return {
    'params': table.count_params(variables['params']),
    'gflops': table.forward_flops(model, variables, crop) / 1e9,
  }


def publish(workdir: str, out: str, base: Optional[str] = None) -> str:
  """Writes the run in `workdir` as a folder `out` (see the module doc).

  Args:
    workdir: a finished run of `python -m vit_jax.main`.
    out: the folder to create; it must not exist yet (nothing is
      overwritten; the folder appears complete or not at all).
    base: the base checkpoint of a task file that holds only the trained
      leaves; default: the one the run recorded.

  Returns:
    `out`.

  Raises:
    ConfigError: `out` exists, or `workdir` holds no finished run with a
      task file.
    CheckpointError: the run's `results.json` is damaged (not JSON).
  """
  if paths.exists(out):
    raise ConfigError(f'{out} exists; remove it or choose another folder.')
  results = _read_results(workdir)
  task_path = _task_path(workdir, results)
  base = base or results_lib.pretrained_path(
    ml_collections.ConfigDict(results['config'])
  )
  (task,) = serving.load_tasks(base, [task_path]).values()
  params = jax.tree.map(np.asarray, task.plain_params())
  model_config, params = plain_vit(task.metadata['model'], params, task.crop)
  num_classes = int(task.metadata['num_classes'])
  heads = (model_config.get('transformer') or {}).get('num_heads')
  hub_config, no_timm = timm_config(
    model_config, params, task.crop, task.class_names
  )
  summary = {
    'model': model_config,
    'crop': task.crop,
    'num_classes': num_classes,
    'class_names': list(task.class_names),
    'dataset': task.metadata.get('dataset'),
    'finetune': results.get('finetune'),
    'pretrained_path': task.metadata.get('pretrained_path'),
    'trained_posemb': task.metadata['model'].get('posemb', 'learned'),
    **_describe_model(model_config, task.crop, num_classes),
  }
  # Readers open config.json first; in a bucket it is uploaded last.
  with paths.staged_folder(out, last=CONFIG_FILE) as staging:
    checkpoint.save(os.path.join(staging, NPZ_FILE), params)
    if hub_config is not None:
      checkpoint.save(
        os.path.join(staging, SAFETENSORS_FILE), params, num_heads=heads
      )
    paths.write_json(
      os.path.join(staging, CONFIG_FILE),
      {**(hub_config or {}), 'vit_jax': summary},
    )
    paths.write_text(
      os.path.join(staging, CLASS_NAMES_FILE),
      ''.join(f'{name}\n' for name in task.class_names),
    )
    paths.write_json(os.path.join(staging, results_lib.RESULTS_FILE), results)
    paths.write_text(
      os.path.join(staging, CARD_FILE),
      model_card(paths.name(out), summary, results, no_timm),
    )
  return out


def _architecture(model_config: Mapping[str, Any]) -> str:
  if models.model_class(model_config.get('model_name') or '') is not (
    models.VisionTransformer
  ):
    options = ', '.join(
      f'{key} {value}'
      for key, value in sorted(model_config.items())
      if key != 'model_name'
    )
    return f'{model_config["model_name"]}: {options}'
  patch = model_config['patches']['size']
  transformer = model_config['transformer']
  stem = model_config.get('conv_stem')
  stem_text = (
    f'a stem of 3x3 stride-2 convolutions {tuple(stem)} wide, then '
    if stem
    else ''
  )
  return (
    f'{model_config.get("model_name", "ViT")}: {stem_text}'
    f'{patch[0]}x{patch[1]} patches, width {model_config["hidden_size"]}, '
    f'{transformer["num_layers"]} layers, {transformer["num_heads"]} '
    f'heads, MLP {transformer["mlp_dim"]}, classifier '
    f'`{model_config.get("classifier", "token")}`'
  )


def _position_note(summary: Mapping[str, Any]) -> str:
  trained = summary['trained_posemb']
  if trained == 'learned':
    return 'learned'
  return (
    f'fixed `{trained}` in training, written here as the equal learned '
    'table (counted in the parameters)'
  )


def _views_note(results: Mapping[str, Any]) -> str:
  """How the test accuracy was scored, when not one view per image."""
  if results.get('eval_views', 1) == 1:
    return ''
  shift = results['config']['eval_shift']
  one_view = 100 * results['test_one_view_accuracy']
  return (
    f' ({views.describe(shift)}, `config.eval_shift={shift}`, as '
    f'`python -m vit_jax.predict --eval_shift={shift}` scores; one view per '
    f'image: {one_view:.1f}%)'
  )


def model_card(
  name: str,
  summary: Mapping[str, Any],
  results: Mapping[str, Any],
  no_timm: Optional[str],
) -> str:
  """A Hugging Face model card (YAML front matter + Markdown) for the run."""
  config = results.get('config', {})
  accuracy = 100 * results['test_accuracy']
  gelu = (
    'tanh approximation'
    if summary['model'].get('approximate_gelu', True)
    else 'exact'
  )
  tags = [
    'image-classification',
    'vision-transformer',
    'jax',
    'flax',
    'vit_jax',
  ] + ([] if no_timm else ['timm'])
  front = ['---', 'pipeline_tag: image-classification']
  if not no_timm:
    front.append('library_name: timm')
  front += ['tags:'] + [f'- {tag}' for tag in tags] + ['---', '']
  start = summary['pretrained_path'] or 'random initialisation (from scratch)'
  trainable = results.get('trainable_params')
  total = results.get('total_params')
  minutes = results.get('wall_time_s', 0) / 60
  command = results.get('command')
  lines = front + [
    f'# {name}',
    '',
    'A Vision Transformer trained with vit_jax (JAX/Flax, checkpoints '
    'compatible with [google-research/vision_transformer]'
    '(https://github.com/google-research/vision_transformer)) on '
    f'`{summary["dataset"]}` ({summary["num_classes"]} classes): '
    f'**{accuracy:.1f}% test accuracy** on {results["test_examples"]:,} '
    f'test images{_views_note(results)}.',
    '',
    '## Model',
    '',
    '| | |',
    '|---|---|',
    f'| architecture | {_architecture(summary["model"])} |',
    f'| parameters | {summary["params"]:,} |',
    f'| compute | {summary["gflops"]:.3f} GFLOPs per image (XLA count) |',
    f'| input | {summary["crop"]}x{summary["crop"]} RGB, resized '
    'bilinearly, scaled to [-1, 1] (mean 0.5, std 0.5) |',
    f'| position embedding | {_position_note(summary)} |',
    f'| GELU | {gelu} |',
    f'| classes | {", ".join(summary["class_names"]) or "unnamed"} |',
    '',
    '## Training',
    '',
    '| | |',
    '|---|---|',
    f'| data | `{summary["dataset"]}` |',
    f'| started from | {start} |',
    f'| fine-tuning | {summary["finetune"]}'
    + (
      f' ({trainable:,} of {total:,} parameters trained)'
      if trainable is not None
      else ''
    )
    + ' |',
    f'| steps | {results.get("steps")} of batch {config.get("batch")}, '
    f'{config.get("optimizer")} at base lr {config.get("base_lr")} '
    f'({config.get("decay_type")} decay, {config.get("warmup_steps")} '
    'warm-up steps) |',
    f'| run time | {minutes:.1f} min on {results.get("devices")} x '
    f'{results.get("device_kind", "device")} |',
    '',
    'Command:',
    '',
    '```bash',
    command
    or '# not recorded: the run was started from Python, with '
    'the config in results.json',
    '```',
    '',
    '## Results',
    '',
    f'Test accuracy {accuracy:.2f}%, test loss {results["test_loss"]:.4f} '
    f'over {results["test_examples"]:,} images (from `results.json`).',
    '',
    '## Files',
    '',
    f"- `{NPZ_FILE}`: weights with Google's vit_jax names.",
    (
      f"- `{SAFETENSORS_FILE}`: weights with timm's names."
      if not no_timm
      else f'- no timm weights: the model has {no_timm}.'
    ),
    (
      f"- `{CONFIG_FILE}`: timm's configuration and, under `vit_jax`, the "
      'model config, crop and class names.'
      if not no_timm
      else f'- `{CONFIG_FILE}`: under `vit_jax`, the model config, crop and '
      'class names.'
    ),
    f'- `{CLASS_NAMES_FILE}`, `{results_lib.RESULTS_FILE}`: class names; the '
    "run's results and full config.",
    '',
    '## Use',
    '',
    '```bash',
    f'python -m vit_jax.predict --checkpoint={name} image.png',
    '```',
  ]
  if not no_timm:
    lines += [
      '',
      '```python',
      'import timm',
      f"model = timm.create_model('local-dir:{name}', pretrained=True)"
      "  # or 'hf-hub:USER/REPO'",
      '```',
    ]
  return '\n'.join(lines) + '\n'


def parser() -> argparse.ArgumentParser:
  """`python -m vit_jax.publish`'s command line."""
  result = argparse.ArgumentParser(
    prog='python -m vit_jax.publish',
    description='A finished run as a folder to share: weights for vit_jax '
    'and timm, config, class names, model card.',
  )
  result.add_argument('--workdir', required=True, help="the run's workdir")
  result.add_argument('--out', required=True, help='the folder to create')
  result.add_argument(
    '--base',
    default=None,
    help='base checkpoint of the task file (default: the one the run recorded)',
  )
  return result


def main(args: argparse.Namespace) -> None:
  """Publishes `args.workdir` as `args.out`, then lists its files."""
  out = publish(args.workdir, args.out, args.base)
  for name in paths.listdir(out):
    path = paths.join(out, name)
    print(f'{path}: {paths.size(path):,} bytes')


if __name__ == '__main__':
  cli.run_argparse(main, parser())
