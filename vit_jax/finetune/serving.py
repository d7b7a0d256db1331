"""Serving fine-tuned tasks: one base checkpoint, many small task files.

The trainer writes what a run trained (`config.finetune.task_file`) with the
model and fine-tuning config it needs. Here a base checkpoint is read once
and every task is rebuilt on top of it:

  tasks = serving.load_tasks(
      'mnist5k.npz', ['runs/digits_ia3/task_params.npz', 'digits_lora.npz'])
  logits = tasks['digits_ia3'].logits(images)  # images at the task's crop
  serving.export(tasks['digits_lora'], 'digits_lora_folded.npz')
  model, params = pretrained.model_from_checkpoint(config.model, 'model.npz',
                                                  224)

Tasks of the same architecture and resolution share the base's arrays (one
copy in memory; a scanned encoder's stacked blocks are one copy per task). `export` folds injected methods into the weights, so the
exported file is a plain ViT checkpoint that any loader of the format reads
and runs at the base model's cost.
"""

import dataclasses
import functools
import json
import os
from typing import (
  Any,
  Callable,
  Dict,
  Mapping,
  Optional,
  Sequence,
  Tuple,
  Union,
)

import jax
import numpy as np

from vit_jax import checkpoint
from vit_jax import paths
from vit_jax import trainable as trainable_lib
from vit_jax.checkpoint import layer_stack
from vit_jax.checkpoint import pretrained
from vit_jax.checkpoint import task_file
from vit_jax.errors import ConfigError
from vit_jax.finetune import modes

PyTree = Any
# configs/common.py's default `finetune.task_file`, without extension.
DEFAULT_TASK_FILE_STEM = 'task_params'


@dataclasses.dataclass(frozen=True)
class Task:
  """A fine-tuned model ready to run.

  Attributes:
    name: the task file's name without extension.
    model: the (possibly injected) model.
    params: the full parameter tree: shared base leaves + the task's.
    finetune: its fine-tuning mode.
    metadata: what the trainer recorded (model and finetune config, crop,
      dataset, class names, test accuracy...).
  """

  name: str
  model: modes.Model
  params: PyTree
  finetune: modes.Finetune
  metadata: Mapping[str, Any]

  @property
  def class_names(self) -> Tuple[str, ...]:
    return tuple(self.metadata.get('class_names') or ())

  @property
  def crop(self) -> int:
    return int(self.metadata['crop'])

  @functools.cached_property
  def _apply(self) -> Callable[[PyTree, np.ndarray], jax.Array]:
    return jax.jit(
      lambda params, x: self.model.apply({'params': params}, x, train=False)
    )

  def logits(self, images: np.ndarray) -> jax.Array:
    """Logits of images `[N, crop, crop, 3]` in [-1, 1] (jitted)."""
    return self._apply(self.params, images)

  def plain_params(self) -> PyTree:
    """The parameters with any injected method folded into the weights."""
    if self.finetune.injection is None:
      return self.params
    return self.finetune.injection.fold(self.params)


def _config(metadata: Mapping[str, Any]) -> Dict[str, Any]:
  """The parts of an experiment config that `modes.build_model` reads."""
  return {
    'model': metadata['model'],
    'finetune': metadata['finetune'],
    'dtype': metadata.get('dtype', 'float32'),
  }


def _base_for(
  ckpt: checkpoint.Checkpoint,
  model,
  fine: modes.Finetune,
  metadata: Mapping[str, Any],
) -> PyTree:
  """The base checkpoint adapted to a task's model (resolution), without a
  head: every task file brings its own."""
  _, zeros = trainable_lib.partition(
    pretrained.zero_params(model, int(metadata['crop'])), fine.is_added
  )
  base = checkpoint.load_pretrained(
    pretrained_path=ckpt,
    init_params=zeros,
    model_config=metadata['model'],
    log=lambda _: None,
  )
  return trainable_lib.partition(base, trainable_lib.is_head)[1]


def task_name(path: str) -> str:
  """The file's name without extension; for the trainer's default file name,
  the name of its workdir (`runs/digits_ia3/task_params.npz` → digits_ia3)."""
  stem = os.path.splitext(paths.name(path))[0]
  if stem == DEFAULT_TASK_FILE_STEM:
    return paths.name(os.path.dirname(paths.absolute(path)))
  return stem


def load_tasks(
  base: Union[None, str, checkpoint.Checkpoint],
  task_paths: Sequence[str],
  *,
  strict: bool = True,
  num_heads: Optional[int] = None,
) -> Dict[str, Task]:
  """Reads `base` once and rebuilds each task file on top of it.

  Args:
    base: the checkpoint the tasks were fine-tuned from (any format
      `vit_jax.checkpoint` reads), or one already read. Not read, and may
      be None, when every task file holds all its parameters
      (`finetune.mode=full`).
    task_paths: files written by the trainer (`config.finetune.task_file`).
    strict: require the base's values to be those each task was trained on
      (see `task_file.load_task_params`).
    num_heads: for timm/HF base files; default: from the first task's model.

  Returns:
    {task name: Task}, in the order given.
  """
  records = {path: task_file.read_record(path) for path in task_paths}
  metadata = {
    path: record.get('metadata', {}) for path, record in records.items()
  }
  for path, meta in metadata.items():
    missing = {'model', 'finetune', 'crop'} - set(meta)
    if missing:
      raise checkpoint.CheckpointError(
        f'{path}: the task file does not record {sorted(missing)}; it was '
        'not written by the trainer. Load it with '
        'task_file.load_task_params and your own model instead.'
      )
  if not any(record['base_shapes'] for record in records.values()):
    base = None  # Every task holds all its parameters.
  if isinstance(base, str):
    first = next(iter(metadata.values()), {})
    heads = num_heads or (first.get('model', {}).get('transformer') or {}).get(
      'num_heads'
    )
    base = checkpoint.read(base, num_heads=heads)
  adapted: Dict[str, PyTree] = {}
  tasks = {}
  for path, meta in metadata.items():
    config = _config(meta)
    fine = modes.from_config(config['finetune'])
    model = modes.build_model(config, int(meta['num_classes']), fine)
    key = json.dumps([config['model'], meta['crop']], sort_keys=True)
    if key not in adapted:
      adapted[key] = {} if base is None else _base_for(base, model, fine, meta)
    params = layer_stack.to_model_layout(
      task_file.load_task_params(path, adapted[key], strict=strict),
      config['model'],
    )
    name = task_name(path)
    if name in tasks:
      raise ConfigError(f'Two task files are named {name!r}; rename one.')
    tasks[name] = Task(name, model, params, fine, meta)
  return tasks


def export(task: Task, path: str) -> None:
  """Writes the task as one plain checkpoint (injection folded in).

  `.npz` gets Google's names, `.safetensors` timm's (see
  `checkpoint.save`); either loads with no fine-tuning code at all.
  """
  params = jax.tree.map(np.asarray, task.plain_params())
  heads = (task.metadata['model'].get('transformer') or {}).get('num_heads')
  checkpoint.save(path, params, num_heads=heads)
