"""Checkpoints: load any supported format, inspect, adapt, and export.

  params = checkpoint.load('ViT-B_16.npz')                      # Google
  ckpt = checkpoint.read('model.safetensors', num_heads=12)     # timm / HF
  model = models.get_model('ViT-B_16', num_classes=10, **ckpt.model_options)
  params = checkpoint.load_pretrained(
      pretrained_path='ViT-B_16.npz', init_params=init['params'],
      model_config=config.model)
  checkpoint.save('exported.safetensors', params, num_heads=12)  # timm names

Formats, detected from the file's keys: Google `.npz` (ImageNet-21k, AugReg
and big_vision layouts, see `google_npz`), timm and Hugging Face transformers
ViT weights as `.safetensors` or as a PyTorch `state_dict` saved to `.npz`
(see `torch_names`), timm's Swin Transformers (see `swin_names`), and the
trainer's task files (see `task_file`) that hold every parameter. Every
error is a `CheckpointError` naming the file.

Files always hold per-layer encoder blocks (`Transformer/encoderblock_{i}`);
`load_pretrained` returns the layout of the model it loads into, stacked for
a scanned encoder, and `save` writes any layout as files hold it (see
`layer_stack`).
"""

import dataclasses
import logging
import os
from typing import Any, Callable, Dict, Mapping, Optional, Union

import numpy as np

from vit_jax import paths
from vit_jax.checkpoint import adapt
from vit_jax.checkpoint import files
from vit_jax.checkpoint import google_npz
from vit_jax.checkpoint import inspect
from vit_jax.checkpoint import layer_stack
from vit_jax.checkpoint import swin_names
from vit_jax.checkpoint import task_file
from vit_jax.checkpoint import torch_names
from vit_jax.errors import CheckpointError

__all__ = [
  'Checkpoint',
  'CheckpointError',
  'inspect_params',
  'load',
  'load_pretrained',
  'read',
  'save',
]

# VisionTransformer's defaults of the options that imports may require.
_MODEL_DEFAULTS = {'approximate_gelu': True, 'layernorm_epsilon': 1e-6}


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """A loaded checkpoint.

  Attributes:
    path: the file it came from.
    format: 'google', 'timm', 'hf' or 'task' (a vit_jax task file).
    params: nested dict of float32 numpy arrays, this project's names.
    model_options: `VisionTransformer` options under which `params` compute
      what they computed in their source (e.g. exact GELU for timm).
    architecture: for timm/HF files, every `VisionTransformer` keyword
      argument inferred from the tensors (`VisionTransformer(**architecture)`
      computes the source model); None for Google files, whose registry name
      says it.
    task: a task file's record (`task_file.read_record`); None otherwise.
  """

  path: str
  format: str
  params: Dict[str, Any]
  model_options: Dict[str, Any]
  architecture: Optional[Dict[str, Any]] = None
  task: Optional[Dict[str, Any]] = None


def _read_arrays(path: str) -> Dict[str, np.ndarray]:
  """The flat {key: array} content of an .npz or .safetensors file."""
  if path.endswith('.safetensors'):
    return files.read_safetensors(path)
  return files.read_npz(path)


def read(
  path: str, *, num_heads: Optional[int] = None, partial: bool = False
) -> Checkpoint:
  """Reads a checkpoint of any supported format.

  Args:
    path: an `.npz` or `.safetensors` file.
    num_heads: attention heads of a timm/HF file, whose fused or
      per-projection matrices do not record how they split into heads. If
      None: the `config.json` beside the file, else width / 64.
    partial: also read a task file that holds only part of a model (e.g.
      its head), to inspect it; its params are that part alone.
  """
  arrays = _read_arrays(path)
  if task_file.is_task_file(arrays):
    return _read_task_file(path, arrays, partial)
  arrays = files.as_float32(arrays)
  if swin_names.is_timm_swin(arrays):
    try:
      params, architecture = swin_names.from_timm(arrays)
    except CheckpointError as e:
      raise CheckpointError(f'{path}: {e}') from e
    return Checkpoint(path, torch_names.TIMM, params, {}, architecture)
  source = torch_names.detect(arrays)
  if source is None:
    return _read_google(path, arrays)
  return _read_torch(path, arrays, source, num_heads)


def _read_google(path: str, arrays: Mapping[str, np.ndarray]) -> Checkpoint:
  """A Google/big_vision `.npz` (no model options: vit_jax's defaults)."""
  flat = google_npz.from_google(arrays)
  if not any(
    key.startswith(('embedding/', 'stem/', 'conv_root/')) for key in flat
  ):
    raise CheckpointError(
      f'{path}: not a ViT/Mixer/Swin/ResNet checkpoint of a known format '
      '(no Google embedding/stem/conv_root, timm or Hugging Face keys); '
      f'first keys: {sorted(arrays)[:5]}.'
    )
  return Checkpoint(path, 'google', inspect.unflatten(flat), {})


def _read_task_file(
  path: str, arrays: Mapping[str, np.ndarray], partial: bool
) -> Checkpoint:
  """A vit_jax task file: its parameters without the record, with the model
  options its record's model config sets. Unless `partial`, one that holds
  only part of a model is an error saying how to make it whole."""
  record, params = task_file.parse(path, arrays)
  if not (partial or task_file.holds_every_parameter(record)):
    base = record['metadata'].get('pretrained_path') or 'BASE.npz'
    raise CheckpointError(
      f'{path}: a task file of finetune.mode={task_file.mode(record)!r}; it '
      f'holds {len(params)} trained arrays, and the other '
      f'{len(record["base_shapes"])} are in the checkpoint it was fine-tuned '
      'from. Join them into one checkpoint first: python -m vit_jax.finetune '
      f'export --base={base} --task={path} --out=whole.npz (then use '
      'whole.npz).'
    )
  model = record['metadata'].get('model') or {}
  options = {key: model[key] for key in _MODEL_DEFAULTS if key in model}
  return Checkpoint(
    path,
    'task',
    inspect.unflatten(files.as_float32(params)),
    options,
    task=record,
  )


# The width of an attention head in every published ViT (Ti 192 / 3,
# S 384 / 6, B 768 / 12, L 1024 / 16, H 1280 / 16).
PUBLISHED_HEAD_WIDTH = 64
# Where the config.json of a timm (`model_args`) or Hugging Face folder keeps
# the head count.
_CONFIG_HEAD_KEYS = (
  ('num_attention_heads',),
  ('num_heads',),
  ('model_args', 'num_heads'),
)
_PATCH_WEIGHTS = (
  'patch_embed.proj.weight',
  'embeddings.patch_embeddings.projection.weight',
)


def _heads_in_config_beside(path: str) -> Optional[int]:
  """The head count in the `config.json` next to `path`, if any."""
  config_path = paths.join(os.path.dirname(path) or '.', 'config.json')
  if not paths.exists(config_path):
    return None
  try:
    config = paths.read_json(config_path)
  except ValueError as e:
    raise CheckpointError(f'{config_path}: not valid JSON ({e}).') from e
  for keys in _CONFIG_HEAD_KEYS:
    value = config
    for key in keys:
      value = value.get(key) if isinstance(value, dict) else None
    if isinstance(value, int) and value > 0:
      logging.info('%s: %d attention heads, from %s', path, value, config_path)
      return value
  return None


def _width(arrays: Mapping[str, np.ndarray]) -> Optional[int]:
  """The hidden size of a timm / HF ViT state dict (its patch embedding's
  output channels)."""
  for key, value in arrays.items():
    if key.endswith(_PATCH_WEIGHTS):
      return int(value.shape[0])
  return None


def _torch_heads(
  path: str, arrays: Mapping[str, np.ndarray], source: str
) -> int:
  """The head count of a state dict that does not record it: from the
  `config.json` beside it (timm and Hugging Face Hub folders have one),
  else one head per 64 channels, as in every published ViT."""
  heads = _heads_in_config_beside(path)
  if heads is not None:
    return heads
  width = _width(arrays)
  if not width or width % PUBLISHED_HEAD_WIDTH:
    raise CheckpointError(
      f'{path}: a {source} checkpoint does not record its number of '
      'attention heads, and there is no config.json beside it that does; '
      'pass num_heads (--num_heads; e.g. 12 for ViT-B).'
    )
  heads = width // PUBLISHED_HEAD_WIDTH
  logging.warning(
    '%s: no num_heads given and no config.json beside it; assuming %d heads '
    '(width %d / %d, as in every published ViT).',
    path,
    heads,
    width,
    PUBLISHED_HEAD_WIDTH,
  )
  return heads


def _read_torch(
  path: str,
  arrays: Mapping[str, np.ndarray],
  source: str,
  num_heads: Optional[int],
) -> Checkpoint:
  """A timm or Hugging Face state dict, with the options of its source."""
  if num_heads is None:
    num_heads = _torch_heads(path, arrays, source)
  convert = torch_names.from_timm if source == 'timm' else torch_names.from_hf
  try:
    params, architecture = convert(arrays, num_heads=num_heads)
  except CheckpointError as e:
    raise CheckpointError(f'{path}: {e}') from e
  options = {key: architecture[key] for key in _MODEL_DEFAULTS}
  return Checkpoint(path, source, params, options, architecture)


def load(path: str, *, num_heads: Optional[int] = None) -> Dict[str, Any]:
  """The parameter tree of a checkpoint file (see `read`)."""
  return read(path, num_heads=num_heads).params


def inspect_params(
  *,
  params: Mapping[str, Any],
  expected: Mapping[str, Any],
  fail_if_extra: bool = True,
  fail_if_missing: bool = True,
  source: str = 'checkpoint',
) -> inspect.TreeDiff:
  """Compares `params` with the `expected` tree, by path and shape.

  Raises:
    CheckpointError: with the full report, if there are shape mismatches, or
      missing (unexpected) paths and `fail_if_missing` (`fail_if_extra`).
  """
  diff = inspect.compare(inspect.shapes(params), inspect.shapes(expected))
  if (
    diff.mismatched
    or (fail_if_missing and diff.missing)
    or (fail_if_extra and diff.unexpected)
  ):
    raise CheckpointError(f'{source} does not fit the model:\n{diff.report()}')
  return diff


def load_pretrained(
  *,
  pretrained_path: Union[str, Checkpoint],
  init_params: Mapping[str, Any],
  model_config: Mapping[str, Any],
  reset_head: bool = True,
  resize_method: str = 'bilinear',
  grid: Optional[adapt.Grid] = None,
  pretrained_grid: Optional[adapt.Grid] = None,
  log: Callable[[str], None] = logging.info,
) -> Dict[str, Any]:
  """Loads a checkpoint and adapts it to the model that `init_params` is of.

  Adapted (and logged): the head (every leaf under `head/`) is replaced by
  the model's freshly initialised one when `reset_head` or when its paths or
  shapes differ;
  `pre_logits` is dropped when the model has none (representation_size
  None); position embeddings are resized to the model's grid. Any other
  difference is an error with the full report.

  Args:
    pretrained_path: checkpoint file, any supported format, or a
      `Checkpoint` already read (to adapt one file to several models without
      reading it again).
    init_params: the model's initialised params (their structure and dtypes
      are the target; a scanned model's stacked blocks too).
    model_config: the model's config (e.g. `config.model`), for the number
      of heads and to check the checkpoint's model options.
    reset_head: start from a zero head even if the sizes match (vit_jax's
      behaviour for fine-tuning); False keeps a head that fits.
    resize_method: 'bilinear' (vit_jax) or 'bicubic'.
    grid: the model's patch grid (rows, columns); default: square.
    pretrained_grid: the checkpoint's patch grid; default: square.
    log: where the adaptations are reported.

  Returns:
    A params tree with exactly `init_params`' paths, shapes and dtypes.
  """
  if isinstance(pretrained_path, Checkpoint):
    ckpt, pretrained_path = pretrained_path, pretrained_path.path
  else:
    transformer = model_config.get('transformer') or {}
    ckpt = read(pretrained_path, num_heads=transformer.get('num_heads'))
  for option, value in ckpt.model_options.items():
    if model_config.get(option, _MODEL_DEFAULTS.get(option)) != value:
      raise CheckpointError(
        f"{pretrained_path}: {ckpt.format} weights compute their source's "
        f'function only with {option}={value!r}; build the model with '
        f'`**checkpoint.read(path).model_options` (or '
        f'--config.model.{option}={value}).'
      )
  # Adapted as files hold them, per layer; stacked again at the end for a
  # scanned model.
  target = layer_stack.to_file_layout(init_params)
  expected = inspect.flatten(target)
  loaded = adapt.adapt_to_model(
    inspect.flatten(layer_stack.to_file_layout(ckpt.params)),
    expected,
    reset_head=reset_head,
    resize_method=resize_method,
    grid=grid,
    pretrained_grid=pretrained_grid,
    log=lambda message: log(f'{pretrained_path}: {message}'),
    source=pretrained_path,
  )
  inspect_params(
    params=inspect.unflatten(loaded),
    expected=target,
    source=pretrained_path,
  )
  return layer_stack.like(
    inspect.unflatten(
      {
        key: np.asarray(loaded[key], dtype=value.dtype)
        for key, value in expected.items()
      }
    ),
    init_params,
  )


def save(
  path: Union[str, Mapping[str, Any]],
  params: Union[Mapping[str, Any], str],
  *,
  num_heads: Optional[int] = None,
) -> None:
  """Writes `params` atomically, in the format of `path`'s extension.

  `.npz`: Google's published naming (read by vit_jax and timm's npz loader).
  A scanned model's stacked blocks are written per layer, as files hold them.
  `.safetensors`: timm's names and layouts (needs `num_heads`, except for a
  Swin tree), loadable by
  `timm.create_model(..., pretrained_cfg_overlay=dict(file=path))`.
  vit_jax's argument order, `save(params, path)`, is accepted too.
  """
  if isinstance(path, Mapping):
    path, params = params, path
  params = layer_stack.to_file_layout(params)
  flat = {
    key: np.asarray(value, np.float32)
    for key, value in inspect.flatten(params).items()
  }
  if path.endswith('.safetensors') and 'stage_0' in params:  # A Swin.
    files.write_safetensors(path, swin_names.to_timm(params))
  elif path.endswith('.safetensors'):
    if num_heads is None:
      raise CheckpointError(f'{path}: saving timm names needs num_heads.')
    files.write_safetensors(
      path, torch_names.to_timm(inspect.unflatten(flat), num_heads)
    )
  elif path.endswith('.npz'):
    files.write_npz(path, google_npz.to_google(flat))
  else:
    raise CheckpointError(
      f'{path}: unknown extension {os.path.splitext(path)[1]!r}; use .npz '
      '(Google names) or .safetensors (timm names).'
    )
