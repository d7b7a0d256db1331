"""timm's Swin Transformer state dict ↔ this project's `SwinTransformer` tree.

  timm                                          here
  patch_embed.proj.{weight,bias}                embedding/{kernel,bias}
  patch_embed.norm.{weight,bias}                embedding_norm/{scale,bias}
  layers.{i}.downsample.norm                    stage_{i}/downsample/norm
  layers.{i}.downsample.reduction.weight        stage_{i}/downsample/reduction/kernel
  layers.{i}.blocks.{j}.norm1                   stage_{i}/block_{j}/LayerNorm_0
  layers.{i}.blocks.{j}.attn.qkv               .../attention/{query,key,value}
  layers.{i}.blocks.{j}.attn.proj              .../attention/out
  layers.{i}.blocks.{j}.attn.relative_position_bias_table  (the same)
  layers.{i}.blocks.{j}.norm2                   .../LayerNorm_1
  layers.{i}.blocks.{j}.mlp.fc{1,2}             .../MlpBlock_0/Dense_{0,1}
  norm                                          encoder_norm
  head.fc (timm ≥ 0.9) or head                  head

Torch `Linear` weights `[out, in]` become kernels `[in, out]`; the fused qkv
rows split into query, key and value, each `[in, heads, head_dim]`; the
projection becomes `[heads, head_dim, out]`. Files of timm < 0.9 (and
Microsoft's originals) keep each stage's patch merging at the *end* of the
previous stage (`layers.{i-1}.downsample`); both layouts load. The buffers
`relative_position_index` and `attn_mask` are recomputed, so they are
skipped. Heads come from the bias tables, so no `num_heads` is needed.
"""

import re
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from vit_jax.checkpoint import inspect
from vit_jax.checkpoint.torch_names import StateReader
from vit_jax.errors import CheckpointError

Params = Dict[str, Any]
_BUFFERS = re.compile(
  r'layers\.\d+\.blocks\.\d+\.(attn\.relative_position_index'
  r'|attn_mask)$'
)
_WHAT = 'timm Swin state dict'


def is_timm_swin(state: Mapping[str, Any]) -> bool:
  """Whether `state` holds a timm Swin (window attention bias tables)."""
  return any(
    key.startswith('layers.')
    and key.endswith('.attn.relative_position_bias_table')
    for key in state
  )


def _linear(
  source: StateReader,
  prefix: str,
  out: Optional[int],
  width: Optional[int],
  bias: bool = True,
) -> Dict[str, np.ndarray]:
  weight = source.take(prefix + '.weight', (out, width))
  leaves = {'kernel': weight.T}
  if bias:
    leaves['bias'] = source.take(prefix + '.bias', (weight.shape[0],))
  return leaves


def _norm(
  source: StateReader, prefix: str, width: int
) -> Dict[str, np.ndarray]:
  return {
    'scale': source.take(prefix + '.weight', (width,)),
    'bias': source.take(prefix + '.bias', (width,)),
  }


def _block(source: StateReader, prefix: str, width: int) -> Tuple[Params, int]:
  """One block's tree, and its heads (from the bias table)."""
  table = source.take(
    prefix + 'attn.relative_position_bias_table', (None, None)
  )
  heads = table.shape[1]
  if width % heads:
    raise CheckpointError(
      f'{prefix}attn: width {width} does not split into '
      f'{heads} heads (from its bias table).'
    )
  qkv = _linear(source, prefix + 'attn.qkv', 3 * width, width)
  head_dim = width // heads
  attention = {'relative_position_bias_table': table}
  for index, name in enumerate(('query', 'key', 'value')):
    part = slice(index * width, (index + 1) * width)
    attention[name] = {
      'kernel': qkv['kernel'][:, part].reshape(width, heads, head_dim),
      'bias': qkv['bias'][part].reshape(heads, head_dim),
    }
  proj = _linear(source, prefix + 'attn.proj', width, width)
  attention['out'] = {
    'kernel': proj['kernel'].reshape(heads, head_dim, width),
    'bias': proj['bias'],
  }
  fc1 = _linear(source, prefix + 'mlp.fc1', None, width)
  fc2 = _linear(source, prefix + 'mlp.fc2', width, fc1['bias'].shape[0])
  return {
    'LayerNorm_0': _norm(source, prefix + 'norm1', width),
    'attention': attention,
    'LayerNorm_1': _norm(source, prefix + 'norm2', width),
    'MlpBlock_0': {'Dense_0': fc1, 'Dense_1': fc2},
  }, heads


def from_timm(state: Mapping[str, Any]) -> Tuple[Params, Dict[str, Any]]:
  """Our parameter tree and the `SwinTransformer` arguments of a timm Swin.

  Raises:
    CheckpointError: for missing, extra or inconsistently shaped tensors.
  """
  source = StateReader(
    {k: v for k, v in state.items() if not _BUFFERS.match(k)},
    _WHAT,
    model='Swin',
  )
  kernel = source.take('patch_embed.proj.weight', (None, 3, None, None))
  width, _, patch, _ = kernel.shape
  params: Params = {
    'embedding': {
      'kernel': kernel.transpose(2, 3, 1, 0),
      'bias': source.take('patch_embed.proj.bias', (width,)),
    },
    'embedding_norm': _norm(source, 'patch_embed.norm', width),
  }
  old_layout = source.has('layers.0.downsample.reduction.weight')
  stages = source.num_layers('layers.')
  depths, heads, window = [], [], None
  for stage in range(stages):
    tree: Params = {}
    merge = (
      f'layers.{stage - 1}.downsample'
      if old_layout
      else (f'layers.{stage}.downsample')
    )
    if stage:
      tree['downsample'] = {
        'norm': _norm(source, merge + '.norm', 4 * width),
        'reduction': _linear(
          source, merge + '.reduction', 2 * width, 4 * width, bias=False
        ),
      }
      width *= 2
    blocks = source.num_layers(f'layers.{stage}.blocks.')
    for block in range(blocks):
      tree[f'block_{block}'], stage_heads = _block(
        source, f'layers.{stage}.blocks.{block}.', width
      )
    table_rows = tree['block_0']['attention'][
      'relative_position_bias_table'
    ].shape[0]
    window = window or int(round((np.sqrt(table_rows) + 1) / 2))
    params[f'stage_{stage}'] = tree
    depths.append(blocks)
    heads.append(stage_heads)
  params['encoder_norm'] = _norm(source, 'norm', width)
  head = 'head.fc' if source.has('head.fc.weight') else 'head'
  num_classes = None
  if source.has(head + '.weight'):
    params['head'] = _linear(source, head, None, width)
    num_classes = params['head']['bias'].shape[0]
  source.check_all_read()
  mlp = params['stage_0']['block_0']['MlpBlock_0']['Dense_0']['bias'].shape[0]
  architecture = {
    'patch_size': patch,
    'embed_dim': params['embedding']['bias'].shape[0],
    'depths': tuple(depths),
    'num_heads': tuple(heads),
    'window_size': window,
    'mlp_ratio': mlp / params['embedding']['bias'].shape[0],
    'num_classes': num_classes,
  }
  return params, architecture


def to_timm(params: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """A timm (≥ 0.9) Swin state dict with our parameters' function."""
  flat = {
    path: np.asarray(value, np.float32)
    for path, value in inspect.flatten(params).items()
  }
  state = {}
  for path, value in flat.items():
    name, value = _timm_name(path, value)
    if name is not None:
      state[name] = value
  qkv_paths = sorted(
    {
      p.rsplit('/', 2)[0]
      for p in flat
      if p.endswith(('/query/kernel', '/query/bias'))
    }
  )
  for attention in qkv_paths:
    prefix = _timm_prefix(attention) + 'qkv.'
    kernels = [
      flat[f'{attention}/{n}/kernel'] for n in ('query', 'key', 'value')
    ]
    width = kernels[0].shape[0]
    state[prefix + 'weight'] = np.concatenate(
      [k.reshape(width, -1) for k in kernels], axis=1
    ).T
    state[prefix + 'bias'] = np.concatenate(
      [
        flat[f'{attention}/{n}/bias'].reshape(-1)
        for n in ('query', 'key', 'value')
      ]
    )
  return {k: np.ascontiguousarray(v) for k, v in state.items()}


def _timm_prefix(attention_path: str) -> str:
  """'stage_1/block_0/attention' → 'layers.1.blocks.0.attn.'."""
  stage, block, _ = attention_path.split('/')
  return (
    f'layers.{stage.removeprefix("stage_")}.blocks.'
    f'{block.removeprefix("block_")}.attn.'
  )


_BLOCK_MODULES = {
  'LayerNorm_0': 'norm1',
  'LayerNorm_1': 'norm2',
  'MlpBlock_0/Dense_0': 'mlp.fc1',
  'MlpBlock_0/Dense_1': 'mlp.fc2',
}
_LEAVES = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}


def _timm_name(
  path: str, value: np.ndarray
) -> Tuple[Optional[str], np.ndarray]:
  """timm's name and layout of one of our leaves (None: part of qkv)."""
  parts = path.split('/')
  leaf = parts[-1]
  if parts[0] == 'embedding':
    if leaf == 'kernel':
      return 'patch_embed.proj.weight', value.transpose(3, 2, 0, 1)
    return 'patch_embed.proj.bias', value
  if parts[0] in ('embedding_norm', 'encoder_norm', 'head'):
    module = {
      'embedding_norm': 'patch_embed.norm',
      'encoder_norm': 'norm',
      'head': 'head.fc',
    }[parts[0]]
    return f'{module}.{_LEAVES[leaf]}', value.T if leaf == 'kernel' else value
  stage = parts[0].removeprefix('stage_')
  if parts[1] == 'downsample':
    return (
      f'layers.{stage}.downsample.{parts[2]}.{_LEAVES[leaf]}',
      value.T if leaf == 'kernel' else value,
    )
  block = f'layers.{stage}.blocks.{parts[1].removeprefix("block_")}.'
  module = '/'.join(parts[2:-1])
  if module == 'attention' and leaf == 'relative_position_bias_table':
    return block + 'attn.relative_position_bias_table', value
  if module in ('attention/query', 'attention/key', 'attention/value'):
    return None, value  # Written as the fused qkv by `to_timm`.
  if module == 'attention/out':
    if leaf == 'kernel':
      return block + 'attn.proj.weight', value.reshape(-1, value.shape[-1]).T
    return block + 'attn.proj.bias', value
  if module in _BLOCK_MODULES:
    return f'{block}{_BLOCK_MODULES[module]}.{_LEAVES[leaf]}', (
      value.T if leaf == 'kernel' else value
    )
  raise CheckpointError(
    f'{path}: not a SwinTransformer parameter; timm has no name for it.'
  )
