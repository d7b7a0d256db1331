"""Injecting a fine-tuning method into a model without changing its code.

`InjectedModel(model, Injection(method, targets))` has the model's `init` and
`apply`, run under a Flax method interceptor: whenever a target layer's
forward pass runs, `method.inject` rewrites its output (creating the
method's parameters inside that layer). Without injection the model and its
parameter tree are exactly the base's, so published checkpoints load as they
are; with it, the added leaves sit next to the layer's `kernel`/`bias`.

Targets are layer kinds, matched by module path; they cover the ViT encoder
and the MLP-Mixer blocks:

  query, key, value, out   the attention projections
  mlp_hidden, mlp_output   the first and second Dense of each MLP block
  layernorm                every LayerNorm of the encoder
"""

import dataclasses
import functools
import re
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

import flax.linen as nn

from vit_jax.checkpoint import inspect
from vit_jax.checkpoint import layer_stack
from vit_jax.errors import ConfigError
from vit_jax.finetune import methods

PyTree = Any

_MLP = r'(MlpBlock_0|token_mixing|channel_mixing)'
# The ViT's attention, and the Swin's window attention.
_ATTENTION = r'(MultiHeadDotProductAttention_0|attention)'
TARGETS: Dict[str, str] = {
  'query': rf'(.*/)?{_ATTENTION}/query',
  'key': rf'(.*/)?{_ATTENTION}/key',
  'value': rf'(.*/)?{_ATTENTION}/value',
  'out': rf'(.*/)?{_ATTENTION}/out',
  'mlp_hidden': rf'(.*/)?{_MLP}/Dense_0',
  'mlp_output': rf'(.*/)?{_MLP}/Dense_1',
  'layernorm': r'(.*/)?(LayerNorm_\d+|encoder_norm|pre_head_layer_norm)',
}


def parse_targets(
  targets: Sequence[str] | str | None, method: methods.Method
) -> Tuple[str, ...]:
  """Target kinds from a comma-separated string or a sequence; default: the
  method's own."""
  if not targets:
    return tuple(method.default_targets)
  given = targets
  if isinstance(targets, str):
    targets = [t.strip() for t in targets.split(',') if t.strip()]
  if not targets:
    raise ConfigError(
      f'config.finetune.injection.targets={given!r} names no layer kind; '
      f'give some of {list(TARGETS)}, comma-separated, or leave it unset '
      f"for {method.name}'s default ({','.join(method.default_targets)})."
    )
  unknown = sorted(set(targets) - set(TARGETS))
  if unknown:
    raise ConfigError(
      f'Unknown injection target(s) {unknown} in '
      f'config.finetune.injection.targets={given!r}; choose from '
      f'{list(TARGETS)} (--config.finetune.injection.targets=key,value).'
    )
  if method.linear_only and 'layernorm' in targets:
    raise ConfigError(
      f'{method.name} adapts weight matrices; it cannot target "layernorm" '
      '(drop it from config.finetune.injection.targets).'
    )
  return tuple(dict.fromkeys(targets))


def _module_paths(params: PyTree) -> Dict[str, Dict[str, Any]]:
  """{module path: {leaf name: value}} of a parameter tree."""
  modules: Dict[str, Dict[str, Any]] = {}
  for path, value in inspect.flatten(params).items():
    module, _, leaf = path.rpartition('/')
    modules.setdefault(module, {})[leaf] = value
  return modules


def _targets_fix(modules: Sequence[str], method: methods.Method) -> str:
  """How to fix targets a model lacks: the kinds of `TARGETS` that match
  one of its `modules` (those `method` can adapt), or another mode."""
  present = [
    t
    for t, pattern in TARGETS.items()
    if any(re.fullmatch(pattern, m) for m in modules)
    and not (method.linear_only and t == 'layernorm')
  ]
  if not present:
    return (
      f'it has no layer {method.name} can target; use '
      'config.finetune.mode=head or full'
    )
  return (
    f'set config.finetune.injection.targets to some of {",".join(present)} '
    f"(unset, it is {method.name}'s default "
    f'{",".join(method.default_targets)})'
  )


@dataclasses.dataclass(frozen=True)
class Injection:
  """A method and the layer kinds it is injected into.

  Attributes:
    method: the strategy (see `methods`).
    targets: kinds of layers, keys of `TARGETS`.
  """

  method: methods.Method
  targets: Tuple[str, ...]

  @functools.cached_property
  def pattern(self) -> re.Pattern:
    """One regular expression for the module paths of all targets."""
    return re.compile('|'.join(f'(?:{TARGETS[t]})' for t in self.targets))

  def is_target(self, module_path: str) -> bool:
    return self.pattern.fullmatch(module_path) is not None

  def is_added(self, path: str) -> bool:
    """Whether a leaf path is a parameter the injection added."""
    module, _, leaf = path.rpartition('/')
    return leaf in self.method.param_names and self.is_target(module)

  def is_trained(self, path: str) -> bool:
    """Added leaves and the base leaves the method trains (BitFit biases)."""
    module, _, leaf = path.rpartition('/')
    return self.is_target(module) and (
      leaf in self.method.param_names or self.method.trains_base(leaf)
    )

  def check_targets(self, params: PyTree) -> Dict[str, List[str]]:
    """{target: matched module paths}; raises if a target matches none."""
    modules = list(_module_paths(params))
    matched = {
      t: [m for m in modules if re.fullmatch(TARGETS[t], m)]
      for t in self.targets
    }
    missing = [t for t, found in matched.items() if not found]
    if missing:
      raise ConfigError(
        f'Injection targets {missing} match no layer of this model; '
        f'{_targets_fix(modules, self.method)} (its modules include '
        f'{modules[:6]}...).'
      )
    return matched

  def interceptor(self) -> Callable:
    """The Flax interceptor that calls `method.inject` on target layers."""
    layer_types = methods.LINEAR_TYPES + methods.NORM_TYPES

    def intercept(next_fun, args, kwargs, context):
      outputs = next_fun(*args, **kwargs)
      module = context.module
      if (
        context.method_name != '__call__'
        or not isinstance(module, layer_types)
        or not self.is_target('/'.join(module.path))
      ):
        return outputs
      if self.method.linear_only and not isinstance(
        module, methods.LINEAR_TYPES
      ):
        raise ConfigError(
          f'{self.method.name} cannot adapt '
          f'{"/".join(module.path)}: not a linear layer.'
        )
      return self.method.inject(module, args[0], outputs)

    return intercept

  def fold(self, params: PyTree) -> PyTree:
    """A plain base-model tree computing what the injected model computes.

    Each target module's added parameters are folded into its kernel/scale
    and bias (`method.fold`); the result has exactly the base model's paths
    and runs without injection, at no extra cost. A scanned model's stacked
    blocks are folded layer by layer and returned stacked.
    """
    flat: Dict[str, Any] = {}
    per_layer = layer_stack.to_file_layout(params)
    for module, leaves in _module_paths(per_layer).items():
      if self.is_target(module) and any(
        name in leaves for name in self.method.param_names
      ):
        leaves = self.method.fold(leaves)
      flat.update(
        {
          f'{module}/{leaf}' if module else leaf: value
          for leaf, value in leaves.items()
        }
      )
    return layer_stack.like(inspect.unflatten(flat), params)


@dataclasses.dataclass(frozen=True)
class InjectedModel:
  """A Flax model whose `init` and `apply` run with an injection.

  Every other attribute is the base model's (`num_classes`, ...). `init`
  checks that each target matched a layer.

  Attributes:
    base: the unbound base model.
    injection: what to inject where.
  """

  base: nn.Module
  injection: Injection

  def init(self, *args, **kwargs) -> Mapping[str, Any]:
    with nn.intercept_methods(self.injection.interceptor()):
      variables = self.base.init(*args, **kwargs)
    self.injection.check_targets(variables['params'])
    return variables

  def apply(self, *args, **kwargs) -> Any:
    with nn.intercept_methods(self.injection.interceptor()):
      return self.base.apply(*args, **kwargs)

  def __getattr__(self, name: str) -> Any:
    if name in ('base', 'injection'):  # Not set yet (copy, unpickling).
      raise AttributeError(name)
    return getattr(self.base, name)
