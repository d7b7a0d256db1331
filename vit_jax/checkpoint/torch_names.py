"""PyTorch ViT state dicts (timm, Hugging Face transformers) to and from ours.

A PyTorch state dict is flat (`'blocks.0.attn.qkv.weight' -> array`) and uses
PyTorch layouts; our tree (see `vit_jax.models.vit`) is nested and uses Flax
layouts. The correspondence, for layer `i`:

  timm                HF transformers (`vit.` prefix optional)   ours
  patch_embed.proj    embeddings.patch_embeddings.projection     embedding
  cls_token           embeddings.cls_token                       cls
  pos_embed           embeddings.position_embeddings             posembed_input
  blocks.i.norm1      encoder.layer.i.layernorm_before           LayerNorm_0
  (transformers 5 names layer i `layers.i`, with attention.{q,k,v,o}_proj and
  mlp.fc{1,2}; files on the Hub keep the names below; both are read)
  blocks.i.attn.qkv   encoder.layer.i.attention.attention.{query,key,value}
  blocks.i.attn.proj  encoder.layer.i.attention.output.dense     out
  blocks.i.norm2      encoder.layer.i.layernorm_after            LayerNorm_1
  blocks.i.mlp.fc1    encoder.layer.i.intermediate.dense         Dense_0
  blocks.i.mlp.fc2    encoder.layer.i.output.dense               Dense_1
  norm                layernorm                                  encoder_norm
  -                   pooler.dense (then tanh)                   pre_logits
  head                classifier                                 head

Layouts: a torch Linear weight is (out, in), our Dense kernel (in, out); the
patch conv is OIHW in torch and HWIO here; attention projections are split
into heads, (D, H, Dh) for query/key/value and (H, Dh, D) for `out`, and timm
fuses query, key and value into one `qkv` Linear of 3 * D outputs. The head
count is not recorded in a state dict, so callers pass `num_heads`.

Both libraries compute what our model computes with `approximate_gelu=False`
(exact erf GELU); their LayerNorm epsilon is 1e-6 (timm) and 1e-12 (HF). The
importers return these options with the parameters (see `from_timm`).
"""

import re
from typing import (
  Any,
  Dict,
  List,
  Mapping,
  NamedTuple,
  Optional,
  Sequence,
  Tuple,
)

from flax import traverse_util
import numpy as np

from vit_jax.errors import CheckpointError

Params = Dict[str, Any]
Pair = Tuple[np.ndarray, np.ndarray]

TIMM = 'timm'
HF = 'hf'
TIMM_LAYERNORM_EPSILON = 1e-6
HF_LAYERNORM_EPSILON = 1e-12

_QKV = ('query', 'key', 'value')
# Within one layer: our module name → the source's tensor-name prefix, for
# everything but query/key/value (fused in timm, separate in HF).
_TIMM_BLOCK = {
  'out': 'attn.proj.',
  'LayerNorm_0': 'norm1.',
  'LayerNorm_1': 'norm2.',
  'Dense_0': 'mlp.fc1.',
  'Dense_1': 'mlp.fc2.',
}


class _HFNames(NamedTuple):
  """Tensor names of one transformers version's ViT layers."""

  layers: str  # Layer i's tensors start with f'{layers}{i}.'.
  qkv: Dict[str, str]  # query/key/value → name prefix within a layer.
  rest: Dict[str, str]  # As _TIMM_BLOCK.


# transformers 4, and the files published on the Hugging Face Hub.
_HF_V4 = _HFNames(
  'encoder.layer.',
  {name: f'attention.attention.{name}.' for name in _QKV},
  {
    'out': 'attention.output.dense.',
    'LayerNorm_0': 'layernorm_before.',
    'LayerNorm_1': 'layernorm_after.',
    'Dense_0': 'intermediate.dense.',
    'Dense_1': 'output.dense.',
  },
)
# transformers 5's `state_dict()` (it renames v4 files when loading them).
_HF_V5 = _HFNames(
  'layers.',
  {
    'query': 'attention.q_proj.',
    'key': 'attention.k_proj.',
    'value': 'attention.v_proj.',
  },
  {
    'out': 'attention.o_proj.',
    'LayerNorm_0': 'layernorm_before.',
    'LayerNorm_1': 'layernorm_after.',
    'Dense_0': 'mlp.fc1.',
    'Dense_1': 'mlp.fc2.',
  },
)
_HF_PREFIX = 'vit.'
# Used only for masked-image-modelling inputs (`bool_masked_pos`), never by
# the classification or feature forward pass, so dropping it loses nothing.
_HF_UNUSED = ('embeddings.mask_token',)
_LISTED_KEYS = 10


class _TorchViT(NamedTuple):
  """A ViT's tensors in PyTorch layouts, halfway between a state dict and ours.

  Pairs are (weight, bias): Linear weights (out, in), the patch conv OIHW,
  LayerNorm weights (D,). Each block maps our module names (LayerNorm_0,
  query, key, value, out, LayerNorm_1, Dense_0, Dense_1) to a pair.
  """

  patch: Pair
  cls: Optional[np.ndarray]
  pos: np.ndarray
  blocks: List[Dict[str, Pair]]
  norm: Pair
  pre_logits: Optional[Pair]
  head: Optional[Pair]


class StateReader:
  """A flat state dict read key by key, so that unread keys can be reported.

  Every read checks the tensor's shape (`None` matches any size) and converts
  it to float32. Keys are matched with an optional `prefix` (HF's `vit.`)
  removed; messages name them as the caller spelled them. `what` names the
  dict in messages, e.g. 'timm state dict'.
  """

  def __init__(
    self,
    state: Mapping[str, Any],
    what: str,
    prefix: str = '',
    model: str = 'ViT',
  ):
    self._what = what
    self._model = model
    self._prefix = prefix
    self._tensors = {}
    self._names = {}
    for name, tensor in state.items():
      key = name.removeprefix(prefix) if prefix else name
      if key in self._tensors:
        raise CheckpointError(
          f'The {what} holds both {self._names[key]!r} and {name!r}, which '
          'name the same tensor; keep only one of them.'
        )
      self._tensors[key] = tensor
      self._names[key] = name

  def has(self, key: str) -> bool:
    return key in self._tensors

  def has_prefix(self, prefix: str) -> bool:
    return any(key.startswith(prefix) for key in self._tensors)

  def take(self, key: str, shape: Sequence[Optional[int]]) -> np.ndarray:
    """Removes and returns `key`, which must have `shape`."""
    if key not in self._tensors:
      also = f' (nor {self._prefix + key!r})' if self._prefix else ''
      raise CheckpointError(
        f'The {self._what} has no {key!r}{also}, which a standard '
        f'{self._model} has; it is of another architecture or incomplete.'
      )
    name = self._names.pop(key)
    tensor = np.asarray(self._tensors.pop(key), np.float32)
    fits = len(tensor.shape) == len(shape) and all(
      want is None or want == got for want, got in zip(shape, tensor.shape)
    )
    if not fits:
      wanted = '(' + ', '.join('?' if s is None else str(s) for s in shape)
      raise CheckpointError(
        f'{name!r} has shape {tensor.shape}, but {wanted}) fits the other '
        f'tensors of the {self._what}; they do not describe one standard '
        f'{self._model}.'
      )
    return tensor

  def pair(
    self,
    prefix: str,
    weight_shape: Sequence[Optional[int]],
    weight: str = 'weight',
    bias: str = 'bias',
  ) -> Pair:
    """Removes `{prefix}{weight}` and `{prefix}{bias}`, of its output width.

    The output width is the first axis of a torch weight, the last of a Flax
    `kernel`.
    """
    kernel = self.take(prefix + weight, weight_shape)
    out = kernel.shape[-1] if weight == 'kernel' else kernel.shape[0]
    return kernel, self.take(prefix + bias, (out,))

  def num_layers(self, prefix: str) -> int:
    """One more than the highest layer index `i` of the keys `{prefix}i.*`."""
    pattern = re.compile(re.escape(prefix) + r'(\d+)[./]')
    indices = [int(m.group(1)) for m in map(pattern.match, self._tensors) if m]
    if not indices:
      raise CheckpointError(
        f'The {self._what} has no {prefix}<i> tensors, so no Transformer '
        f'layers; it is not a complete {self._model}.'
      )
    return max(indices) + 1

  def discard(self, key: str) -> None:
    """Forgets `key` if present: for tensors known not to affect the output."""
    self._tensors.pop(key, None)

  def check_all_read(self) -> None:
    """Raises if a tensor was not read, rather than dropping it silently."""
    if self._tensors:
      names = sorted(self._names.values())
      listed = ', '.join(repr(n) for n in names[:_LISTED_KEYS])
      more = len(names) - _LISTED_KEYS
      listed += f' and {more} more' if more > 0 else ''
      raise CheckpointError(
        f'{len(names)} tensor(s) of the {self._what} have no counterpart '
        f'in the target: {listed}. They belong to parts the other model '
        'lacks (e.g. LayerScale, register tokens, an attention-pool head), '
        'so no faithful conversion exists.'
      )


def detect(state: Mapping[str, Any]) -> Optional[str]:
  """Names the library whose ViT names `state` uses: 'timm', 'hf' or None."""
  keys = [k.removeprefix(_HF_PREFIX) for k in state]
  if any(
    k.startswith(('embeddings.patch_embeddings.', 'encoder.layer.'))
    for k in keys
  ):
    return HF
  if any(k.startswith(('patch_embed.proj.', 'blocks.')) for k in state):
    return TIMM
  return None


def from_timm(
  state: Mapping[str, Any], num_heads: int
) -> Tuple[Params, Dict[str, Any]]:
  """Our parameter tree and model options for a timm `VisionTransformer`.

  A state dict with `cls_token` maps to classifier 'token' (timm's
  global_pool='token'; the dict does not record the pooling, and a model with
  a class token and `global_pool='avg'` averages patch tokens only, which no
  classifier of ours does). One without maps to 'gap' (timm's `avg` pooling
  with `fc_norm=False`, i.e. the final `norm` applied before pooling).

  Not supported, each raising here or (the last) failing at the first apply:
  LayerScale (`ls1.gamma`), register tokens, attention pooling, `fc_norm`,
  and `no_embed_class=True` with a class token (DeiT III), whose `pos_embed`
  has no class-token row, which no tensor name reveals.

  Args:
    state: flat timm state dict, numpy-convertible tensors.
    num_heads: attention heads of the source model (not in the state dict).

  Returns:
    `(params, info)`: the nested float32 parameter tree and the keyword
    arguments of `VisionTransformer` that make it compute what the timm model
    computes (num_classes, patches, hidden_size, transformer, classifier,
    representation_size, approximate_gelu, layernorm_epsilon).

  Raises:
    CheckpointError: on missing, misshapen or unknown keys, on `fc_norm`
      (normalisation after pooling), or a `num_heads` that does not divide
      the hidden size.
  """
  source = StateReader(state, 'timm state dict')
  if source.has('fc_norm.weight'):
    raise CheckpointError(
      "The timm state dict has 'fc_norm.*': that model normalises the "
      "average of its tokens (LayerNorm after pooling), while vit_jax's "
      "'gap' classifier applies Transformer/encoder_norm to every token "
      'before averaging. LayerNorm does not commute with the mean, so no '
      'parameters of ours compute that function; import a timm ViT with a '
      'class token, or one trained with fc_norm=False.'
    )
  vit = _timm_parts(source)
  source.check_all_read()
  return _params_from_torch(vit, num_heads), _info(
    vit, num_heads, TIMM_LAYERNORM_EPSILON
  )


def from_hf(
  state: Mapping[str, Any],
  num_heads: int,
  layernorm_epsilon: float = HF_LAYERNORM_EPSILON,
) -> Tuple[Params, Dict[str, Any]]:
  """Our parameter tree and model options for an HF transformers ViT.

  Accepts `ViTModel` and `ViTForImageClassification` state dicts, keys with
  or without the `vit.` prefix. The classifier reads the normed class token,
  as our 'token' classifier does. The pooler (Dense + tanh on the class
  token) becomes our `pre_logits` when there is no classifier, so the model
  returns `ViTModel`'s `pooler_output`; next to a classifier it is dropped,
  because HF's classification output does not use it. `embeddings.mask_token`
  (masked image modelling inputs only) is dropped too.

  Args:
    state: flat HF state dict, numpy-convertible tensors.
    num_heads: `config.num_attention_heads` of the source model.
    layernorm_epsilon: `config.layer_norm_eps` (1e-12 unless changed).

  Returns:
    `(params, info)` as `from_timm`.

  Raises:
    CheckpointError: as `from_timm`.
  """
  source = StateReader(state, 'HF state dict', prefix=_HF_PREFIX)
  for key in _HF_UNUSED:
    source.discard(key)
  vit = _hf_parts(source)
  source.check_all_read()
  return _params_from_torch(vit, num_heads), _info(
    vit, num_heads, layernorm_epsilon
  )


def to_timm(
  params: Mapping[str, Any], num_heads: Optional[int] = None
) -> Dict[str, np.ndarray]:
  """A timm `VisionTransformer` state dict with our parameters' function.

  A tree with `cls` loads into timm's default ViT of the same size; one
  without (our 'gap' classifier) into one built with `class_token=False,
  global_pool='avg', fc_norm=False`. Build it with `act_layer` exact GELU
  (timm's default) and run our model with `approximate_gelu=False` for the
  two to agree.

  Args:
    params: our parameter tree (numpy or JAX arrays).
    num_heads: optional; checked against the heads of the attention kernels,
      which record the head count themselves.

  Returns:
    A flat dict of contiguous float32 arrays, ready for `files.write_safetensors`.

  Raises:
    CheckpointError: for trees timm's ViT cannot hold (`pre_logits`, a hybrid
      ResNet root, no learned position embedding) or inconsistent shapes.
  """
  vit = _torch_from_params(params, num_heads)
  if vit.pre_logits is not None:
    raise CheckpointError(
      "The tree has 'pre_logits' (a tanh representation layer), which "
      "timm's VisionTransformer does not have; fine-tune or export a model "
      'built with representation_size=None.'
    )
  return _contiguous(_timm_state(vit))


# timm.
#######


def _timm_parts(source: StateReader) -> _TorchViT:
  """Reads a timm ViT's tensors, checking every shape against the others."""
  patch_weight = source.take('patch_embed.proj.weight', (None, 3, None, None))
  d = patch_weight.shape[0]
  patch = patch_weight, source.take('patch_embed.proj.bias', (d,))
  cls = source.take('cls_token', (1, 1, d)) if source.has('cls_token') else None
  pos = source.take('pos_embed', (1, None, d))
  blocks = []
  for i in range(source.num_layers('blocks.')):
    mlp_dim = blocks[0]['Dense_0'][0].shape[0] if blocks else None
    blocks.append(_timm_block(source, f'blocks.{i}.', d, mlp_dim))
  norm = source.pair('norm.', (d,))
  head = source.pair('head.', (None, d)) if source.has('head.weight') else None
  return _TorchViT(patch, cls, pos, blocks, norm, None, head)


def _timm_block(
  source: StateReader, prefix: str, d: int, mlp_dim: Optional[int]
) -> Dict[str, Pair]:
  """One timm block; its fused qkv Linear split into query, key and value."""
  qkv_weight, qkv_bias = source.pair(prefix + 'attn.qkv.', (3 * d, d))
  block = dict(zip(_QKV, zip(np.split(qkv_weight, 3), np.split(qkv_bias, 3))))
  block.update(_read_block_rest(source, prefix, _TIMM_BLOCK, d, mlp_dim))
  return block


def _timm_state(vit: _TorchViT) -> Dict[str, np.ndarray]:
  """Names `vit`'s tensors as timm does, fusing query, key and value."""
  state = {
    'patch_embed.proj.weight': vit.patch[0],
    'patch_embed.proj.bias': vit.patch[1],
    'pos_embed': vit.pos,
  }
  if vit.cls is not None:
    state['cls_token'] = vit.cls
  pairs = {'norm': vit.norm, 'head': vit.head}
  for i, block in enumerate(vit.blocks):
    prefix = f'blocks.{i}.'
    state[prefix + 'attn.qkv.weight'] = np.concatenate(
      [block[name][0] for name in _QKV]
    )
    state[prefix + 'attn.qkv.bias'] = np.concatenate(
      [block[name][1] for name in _QKV]
    )
    pairs.update(
      {
        prefix + name.rstrip('.'): block[module]
        for module, name in _TIMM_BLOCK.items()
      }
    )
  for name, pair in pairs.items():
    if pair is not None:
      state[name + '.weight'], state[name + '.bias'] = pair
  return state


# Hugging Face transformers.
############################


def _hf_parts(source: StateReader) -> _TorchViT:
  """Reads an HF ViT's tensors (prefix stripped), checking every shape."""
  patch_weight = source.take(
    'embeddings.patch_embeddings.projection.weight', (None, 3, None, None)
  )
  d = patch_weight.shape[0]
  patch = (
    patch_weight,
    source.take('embeddings.patch_embeddings.projection.bias', (d,)),
  )
  cls = source.take('embeddings.cls_token', (1, 1, d))
  pos = source.take('embeddings.position_embeddings', (1, None, d))
  names = _HF_V4 if source.has_prefix(_HF_V4.layers) else _HF_V5
  blocks = []
  for i in range(source.num_layers(names.layers)):
    mlp_dim = blocks[0]['Dense_0'][0].shape[0] if blocks else None
    blocks.append(_hf_block(source, f'{names.layers}{i}.', names, d, mlp_dim))
  norm = source.pair('layernorm.', (d,))
  head = None
  if source.has('classifier.weight'):
    head = source.pair('classifier.', (None, d))
    source.discard('pooler.dense.weight')
    source.discard('pooler.dense.bias')
  pre_logits = None
  if source.has('pooler.dense.weight'):
    pre_logits = source.pair('pooler.dense.', (None, d))
  return _TorchViT(patch, cls, pos, blocks, norm, pre_logits, head)


def _hf_block(
  source: StateReader,
  prefix: str,
  names: _HFNames,
  d: int,
  mlp_dim: Optional[int],
) -> Dict[str, Pair]:
  """One HF `ViTLayer`, named as `names` says."""
  block = {name: source.pair(prefix + names.qkv[name], (d, d)) for name in _QKV}
  block.update(_read_block_rest(source, prefix, names.rest, d, mlp_dim))
  return block


def _read_block_rest(
  source: StateReader,
  prefix: str,
  names: Mapping[str, str],
  d: int,
  mlp_dim: Optional[int],
) -> Dict[str, Pair]:
  """A layer's attention output, norms and MLP, named through `names`."""
  block = {
    module: source.pair(prefix + names[module], shape)
    for module, shape in (
      ('out', (d, d)),
      ('LayerNorm_0', (d,)),
      ('LayerNorm_1', (d,)),
      ('Dense_0', (mlp_dim, d)),
    )
  }
  block['Dense_1'] = source.pair(
    prefix + names['Dense_1'], (d, block['Dense_0'][0].shape[0])
  )
  return block


# Shared: layouts and options.
##############################


def _head_dim(hidden: int, num_heads: int) -> int:
  """`hidden // num_heads`, if the heads split the hidden size evenly."""
  if num_heads < 1 or hidden % num_heads:
    raise CheckpointError(
      f'num_heads={num_heads} does not divide the hidden size {hidden}; pass '
      'the attention heads of the source model (ViT-Ti 3, ViT-S 6, ViT-B '
      '12, ViT-L and ViT-H 16).'
    )
  return hidden // num_heads


def _params_from_torch(vit: _TorchViT, num_heads: int) -> Params:
  """Our nested tree from torch layouts: transposes and head splits."""
  d = vit.patch[0].shape[0]
  head_dim = _head_dim(d, num_heads)
  flat = {
    'embedding/kernel': vit.patch[0].transpose(2, 3, 1, 0),
    'embedding/bias': vit.patch[1],
    'Transformer/posembed_input/pos_embedding': vit.pos,
  }
  if vit.cls is not None:
    flat['cls'] = vit.cls
  norms = {'Transformer/encoder_norm': vit.norm}
  linears = {'pre_logits': vit.pre_logits, 'head': vit.head}
  for i, block in enumerate(vit.blocks):
    prefix = f'Transformer/encoderblock_{i}/'
    attention = prefix + 'MultiHeadDotProductAttention_0/'
    for name in _QKV:
      weight, bias = block[name]
      flat[f'{attention}{name}/kernel'] = weight.T.reshape(
        d, num_heads, head_dim
      )
      flat[f'{attention}{name}/bias'] = bias.reshape(num_heads, head_dim)
    weight, flat[attention + 'out/bias'] = block['out']
    flat[attention + 'out/kernel'] = weight.T.reshape(num_heads, head_dim, d)
    norms[prefix + 'LayerNorm_0'] = block['LayerNorm_0']
    norms[prefix + 'LayerNorm_1'] = block['LayerNorm_1']
    linears[prefix + 'MlpBlock_0/Dense_0'] = block['Dense_0']
    linears[prefix + 'MlpBlock_0/Dense_1'] = block['Dense_1']
  for path, (scale, bias) in norms.items():
    flat[path + '/scale'], flat[path + '/bias'] = scale, bias
  for path, pair in linears.items():
    if pair is not None:
      flat[path + '/kernel'], flat[path + '/bias'] = _transposed(pair)
  return traverse_util.unflatten_dict(_contiguous(flat), sep='/')


def _torch_from_params(
  params: Mapping[str, Any], num_heads: Optional[int]
) -> _TorchViT:
  """Torch layouts from our tree, checking shapes and that all is used."""
  source = StateReader(
    traverse_util.flatten_dict(params, sep='/'), 'vit_jax parameter tree'
  )
  if source.has('conv_root/kernel'):
    raise CheckpointError(
      "The tree has a ResNet root ('conv_root', 'block1', ...): a hybrid "
      "model, which timm's VisionTransformer cannot hold; export a plain "
      'ViT.'
    )
  kernel = source.take('embedding/kernel', (None, None, 3, None))
  d = kernel.shape[-1]
  patch = kernel.transpose(3, 2, 0, 1), source.take('embedding/bias', (d,))
  cls = source.take('cls', (1, 1, d)) if source.has('cls') else None
  if not source.has('Transformer/posembed_input/pos_embedding'):
    raise CheckpointError(
      "The tree has no 'Transformer/posembed_input/pos_embedding'; timm's "
      'ViT needs a learned position embedding, so export a model built '
      "with posemb='learned' (not 'sincos2d' or 'none')."
    )
  pos = source.take('Transformer/posembed_input/pos_embedding', (1, None, d))
  blocks, heads = [], (None, None)
  for i in range(source.num_layers('Transformer/encoderblock_')):
    block, heads = _our_block(
      source, f'Transformer/encoderblock_{i}/', d, heads
    )
    blocks.append(block)
  if num_heads is not None and num_heads != heads[0]:
    raise CheckpointError(
      f'num_heads={num_heads}, but the attention kernels of the tree have '
      f'{heads[0]} heads of {heads[1]}; pass num_heads={heads[0]} or omit '
      'it.'
    )
  norm = source.pair('Transformer/encoder_norm/', (d,), weight='scale')
  pre_logits = head = None
  if source.has('pre_logits/kernel'):
    pre_logits = _transposed(source.pair('pre_logits/', (d, None), 'kernel'))
  if source.has('head/kernel'):
    width = d if pre_logits is None else pre_logits[0].shape[0]
    head = _transposed(source.pair('head/', (width, None), 'kernel'))
  source.check_all_read()
  return _TorchViT(patch, cls, pos, blocks, norm, pre_logits, head)


def _our_block(
  source: StateReader,
  prefix: str,
  d: int,
  heads: Tuple[Optional[int], Optional[int]],
) -> Tuple[Dict[str, Pair], Tuple[int, int]]:
  """One of our encoder blocks in torch layouts, and its (heads, head_dim).

  `heads` constrains the attention kernels (None: any), so that every block
  must have the heads of the first.
  """
  attention = prefix + 'MultiHeadDotProductAttention_0/'
  query = source.take(attention + 'query/kernel', (d, *heads))
  heads = query.shape[1:]
  block = {}
  for name in _QKV:
    kernel = (
      query
      if name == 'query'
      else source.take(f'{attention}{name}/kernel', (d, *heads))
    )
    bias = source.take(f'{attention}{name}/bias', heads)
    block[name] = kernel.reshape(d, -1).T, bias.reshape(-1)
  kernel = source.take(attention + 'out/kernel', (*heads, d))
  block['out'] = (
    kernel.reshape(-1, d).T,
    source.take(attention + 'out/bias', (d,)),
  )
  block['LayerNorm_0'] = source.pair(prefix + 'LayerNorm_0/', (d,), 'scale')
  block['LayerNorm_1'] = source.pair(prefix + 'LayerNorm_1/', (d,), 'scale')
  mlp = prefix + 'MlpBlock_0/'
  block['Dense_0'] = _transposed(
    source.pair(mlp + 'Dense_0/', (d, None), 'kernel')
  )
  block['Dense_1'] = _transposed(
    source.pair(mlp + 'Dense_1/', (None, d), 'kernel')
  )
  return block, heads


def _transposed(pair: Pair) -> Pair:
  """A torch Linear's (weight, bias) as a Dense (kernel, bias), or back."""
  return pair[0].T, pair[1]


def _contiguous(flat: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """C-contiguous arrays (copies of transposed views): files need them."""
  return {key: np.ascontiguousarray(value) for key, value in flat.items()}


def _info(vit: _TorchViT, num_heads: int, epsilon: float) -> Dict[str, Any]:
  """`VisionTransformer` keyword arguments under which ours computes `vit`.

  Dropout rates are 0, the defaults of both timm and HF.
  """
  return {
    'num_classes': 0 if vit.head is None else vit.head[0].shape[0],
    'patches': {'size': tuple(vit.patch[0].shape[2:])},
    'hidden_size': vit.patch[0].shape[0],
    'transformer': {
      'num_layers': len(vit.blocks),
      'mlp_dim': vit.blocks[0]['Dense_0'][0].shape[0],
      'num_heads': num_heads,
      'dropout_rate': 0.0,
      'attention_dropout_rate': 0.0,
    },
    'classifier': 'gap' if vit.cls is None else 'token',
    'representation_size': (
      None if vit.pre_logits is None else vit.pre_logits[0].shape[0]
    ),
    'approximate_gelu': False,
    'layernorm_epsilon': epsilon,
  }
