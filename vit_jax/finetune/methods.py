"""Parameter-efficient fine-tuning methods, as small pluggable strategies.

A method says what it does to the output of one target layer (a Dense,
DenseGeneral or LayerNorm picked by `injection.TARGETS`), which parameters it
adds there, which base parameters it trains, and how its parameters fold back
into the layer's own weights. Adding a method is one class here:

  @register
  @dataclasses.dataclass(frozen=True)
  class MyMethod(Method):
    name = 'mine'
    default_targets = ('query', 'value')
    param_names = ('mine_scale',)
    def inject(self, module, inputs, outputs): ...

after which `--config.finetune.injection.method=mine` selects it. The model
code is not touched: `injection.InjectedModel` calls `inject` around the
targets' forward passes. New parameters live inside the target module, next
to its `kernel`/`bias` (e.g. `.../MultiHeadDotProductAttention_0/key/ia3_scale`),
so their paths say where they act.

Every shipped method starts as the identity (ones, zeros, a zero LoRA `B`), so
an injected model at initialisation computes exactly the base model.
"""

import abc
import dataclasses
from typing import Any, ClassVar, Dict, Mapping, Tuple, Type

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.errors import ConfigError

Array = jax.Array
Leaves = Dict[str, Any]

LINEAR_TYPES = (nn.Dense, nn.DenseGeneral)
NORM_TYPES = (nn.LayerNorm,)


def output_shape(module: nn.Module, inputs: Array) -> Tuple[int, ...]:
  """The trailing output dimensions a per-feature vector broadcasts over."""
  if isinstance(module, LINEAR_TYPES):
    features = module.features
    return (
      tuple(features) if isinstance(features, (tuple, list)) else (features,)
    )
  return (inputs.shape[-1],)


def weight_name(module_leaves: Mapping[str, Any]) -> str:
  """'kernel' for linear layers, 'scale' for LayerNorm."""
  return 'kernel' if 'kernel' in module_leaves else 'scale'


class Method(abc.ABC):
  """What a fine-tuning method injects into a target layer and trains.

  Class attributes:
    name: the config name (`config.finetune.injection.method`).
    default_targets: target kinds used when the config names none.
    param_names: leaf names the method adds inside each target module; they
      are trainable.
    linear_only: the method needs a weight matrix (fails on LayerNorm).
  """

  name: ClassVar[str]
  default_targets: ClassVar[Tuple[str, ...]]
  param_names: ClassVar[Tuple[str, ...]] = ()
  linear_only: ClassVar[bool] = False

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> 'Method':
    """The method with its options from `config.finetune.injection`."""
    del config
    return cls()

  def inject(self, module: nn.Module, inputs: Array, outputs: Array) -> Array:
    """The target's new output; may create parameters with `module.param`.

    Called inside `module`'s forward pass, after it computed `outputs` from
    `inputs`. The default changes nothing (methods that only train existing
    parameters).
    """
    del module, inputs
    return outputs

  def trains_base(self, leaf_name: str) -> bool:
    """Whether this base leaf of a target module is trained (BitFit)."""
    del leaf_name
    return False

  def fold(self, leaves: Leaves) -> Leaves:
    """One target module's leaves with the method's parameters folded in.

    The result has only the base leaves and computes, without injection, what
    the injected module computed. Methods that add no parameters return the
    leaves unchanged.
    """
    if any(name in leaves for name in self.param_names):
      raise NotImplementedError(f'{self.name} cannot be folded into the base.')
    return dict(leaves)


METHODS: Dict[str, Type[Method]] = {}


def register(cls: Type[Method]) -> Type[Method]:
  """Class decorator: makes `cls` selectable by its `name` in the config."""
  if cls.name in METHODS:
    raise ValueError(
      f'A fine-tuning method named {cls.name!r} is already '
      f'registered ({METHODS[cls.name].__name__}).'
    )
  METHODS[cls.name] = cls
  return cls


def get_method(name: str, config: Mapping[str, Any]) -> Method:
  """The registered method `name`, configured from `config`."""
  if name not in METHODS:
    raise ConfigError(
      f'Unknown injection method {name!r}; registered: {sorted(METHODS)} '
      '(--config.finetune.injection.method=...).'
    )
  return METHODS[name].from_config(config)


def _vector(module: nn.Module, name: str, init, shape) -> Array:
  """A float32 per-feature parameter of the target module."""
  return module.param(name, init, shape, jnp.float32)


@register
@dataclasses.dataclass(frozen=True)
class IA3(Method):
  """IA³ (Liu et al., 2022): `h = l ⊙ (Wx + b)`, with `l` starting at 1.

  The default targets are IA³'s choice: the attention keys and values and the
  MLP hidden layer (before its non-linearity), i.e. rescaling what attention
  reads and which MLP units fire. 2·D + mlp_dim values per layer.
  """

  name = 'ia3'
  default_targets = ('key', 'value', 'mlp_hidden')
  param_names = ('ia3_scale',)

  def inject(self, module, inputs, outputs):
    scale = _vector(
      module, 'ia3_scale', nn.initializers.ones, output_shape(module, inputs)
    )
    return outputs * scale.astype(outputs.dtype)

  def fold(self, leaves):
    scale = leaves['ia3_scale']
    folded = {k: v for k, v in leaves.items() if k != 'ia3_scale'}
    weight = weight_name(leaves)
    folded[weight] = leaves[weight] * scale
    if 'bias' in leaves:
      folded['bias'] = leaves['bias'] * scale
    return folded


@register
@dataclasses.dataclass(frozen=True)
class SSF(Method):
  """SSF (Lian et al., 2022): `h = γ ⊙ (Wx + b) + β`, starting at γ=1, β=0.

  The paper initialises γ ~ N(1, σ) and β ~ N(0, σ); starting exactly at the
  identity keeps the pre-trained function at step 0. By default after every
  linear layer and LayerNorm of the encoder, as in the paper.
  """

  name = 'ssf'
  default_targets = (
    'query',
    'key',
    'value',
    'out',
    'mlp_hidden',
    'mlp_output',
    'layernorm',
  )
  param_names = ('ssf_scale', 'ssf_shift')

  def inject(self, module, inputs, outputs):
    shape = output_shape(module, inputs)
    scale = _vector(module, 'ssf_scale', nn.initializers.ones, shape)
    shift = _vector(module, 'ssf_shift', nn.initializers.zeros, shape)
    return outputs * scale.astype(outputs.dtype) + shift.astype(outputs.dtype)

  def fold(self, leaves):
    if 'bias' not in leaves:
      raise ValueError('ssf cannot fold its shift into a layer without a bias.')
    scale, shift = leaves['ssf_scale'], leaves['ssf_shift']
    folded = {k: v for k, v in leaves.items() if k not in self.param_names}
    weight = weight_name(leaves)
    folded[weight] = leaves[weight] * scale
    folded['bias'] = leaves['bias'] * scale + shift
    return folded


@register
@dataclasses.dataclass(frozen=True)
class LoRA(Method):
  """LoRA (Hu et al., 2021): `h = Wx + b + (alpha / rank) · B(Ax)`.

  `A` ([inputs..., rank]) starts Gaussian with variance 1/fan-in and `B`
  ([rank, outputs...]) at zero, so the update starts at zero. The default
  targets are the paper's: the query and value projections.

  Attributes:
    rank: inner dimension of the low-rank update.
    alpha: the update is scaled by alpha / rank, so changing the rank keeps
      the effective step size.
  """

  rank: int = 8
  alpha: float = 8.0
  name = 'lora'
  default_targets = ('query', 'value')
  param_names = ('lora_a', 'lora_b')
  linear_only = True

  @classmethod
  def from_config(cls, config):
    if config['rank'] < 1:
      raise ConfigError(
        f'config.finetune.injection.rank={config["rank"]}; LoRA needs >= 1.'
      )
    return cls(rank=int(config['rank']), alpha=float(config['alpha']))

  def inject(self, module, inputs, outputs):
    axes = module.axis if isinstance(module, nn.DenseGeneral) else -1
    axes = tuple(
      a % inputs.ndim
      for a in (axes if isinstance(axes, (tuple, list)) else (axes,))
    )
    in_shape = tuple(inputs.shape[a] for a in axes)
    a_init = nn.initializers.variance_scaling(
      1.0, 'fan_in', 'normal', in_axis=tuple(range(len(in_shape))), out_axis=-1
    )
    lora_a = module.param(
      'lora_a', a_init, in_shape + (self.rank,), jnp.float32
    )
    lora_b = module.param(
      'lora_b',
      nn.initializers.zeros,
      (self.rank,) + output_shape(module, inputs),
      jnp.float32,
    )
    dtype = outputs.dtype
    low = jnp.tensordot(
      inputs.astype(dtype),
      lora_a.astype(dtype),
      axes=(axes, tuple(range(len(axes)))),
    )
    update = jnp.tensordot(low, lora_b.astype(dtype), axes=1)
    return outputs + (self.alpha / self.rank) * update

  def fold(self, leaves):
    delta = jnp.tensordot(leaves['lora_a'], leaves['lora_b'], axes=1)
    folded = {k: v for k, v in leaves.items() if k not in self.param_names}
    folded['kernel'] = leaves['kernel'] + (self.alpha / self.rank) * delta
    return folded


@register
@dataclasses.dataclass(frozen=True)
class BitFit(Method):
  """BitFit (Ben Zaken et al., 2021): train only the targets' biases.

  Adds no parameters, so nothing to fold: the trained biases are the model.
  The default targets are every linear layer and LayerNorm of the encoder
  (the paper trains all bias terms).
  """

  name = 'bitfit'
  default_targets = (
    'query',
    'key',
    'value',
    'out',
    'mlp_hidden',
    'mlp_output',
    'layernorm',
  )

  def trains_base(self, leaf_name):
    return leaf_name == 'bias'
