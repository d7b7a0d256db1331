"""Fine-tuning modes from the config: which model to build, what trains.

  full       every parameter trains (vit_jax's fine-tuning).
  head       the pre-trained model is frozen; only the head trains.
  injection  the pre-trained model is frozen; a method (`methods`) is
             injected into the encoder and trains with the head.

`config.finetune.trainable` (comma-separated regular expressions over
'/'-joined parameter paths) adds leaves that train in the modes that freeze,
e.g. 'head/.*,.*/LayerNorm_.*'. `Finetune.is_trainable` is the run's one
decision of what trains (see `vit_jax.trainable`).

`config.finetune.head` picks the head in every mode: 'linear' (vit_jax's
Dense) or 'mlp' (`models.heads.MlpHead`).
"""

import dataclasses
import re
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import flax.linen as nn
import jax.numpy as jnp

from vit_jax import models
from vit_jax import trainable as trainable_lib
from vit_jax.errors import ConfigError
from vit_jax.finetune import injection as injection_lib
from vit_jax.finetune import methods

MODES = ('full', 'head', 'injection')
HEADS = ('linear', 'mlp')

Model = Union[nn.Module, injection_lib.InjectedModel]


@dataclasses.dataclass(frozen=True)
class Finetune:
  """A fine-tuning mode, resolved from `config.finetune`.

  Attributes:
    mode: one of `MODES`.
    injection: the injection of mode 'injection', else None.
    patterns: `config.finetune.trainable`: more leaves that train.
  """

  mode: str
  injection: Optional[injection_lib.Injection] = None
  patterns: Tuple[re.Pattern, ...] = ()

  def wrap(self, model: nn.Module) -> Model:
    """The model to train: `model`, or `model` with the injection."""
    if self.injection is None:
      return model
    return injection_lib.InjectedModel(model, self.injection)

  def is_trainable(self, path: str) -> bool:
    """Whether the leaf at `path` trains: every leaf in mode 'full'; else
    the head, the injection's leaves and those `patterns` match."""
    if self.mode == 'full' or trainable_lib.is_head(path):
      return True
    if self.injection is not None and self.injection.is_trained(path):
      return True
    return any(p.fullmatch(path) for p in self.patterns)

  def check(self, params: Any) -> None:
    """Config errors for a pattern matching no leaf of `params`."""
    trainable_lib.check_patterns(self.patterns, params)

  def is_added(self, path: str) -> bool:
    """Whether the leaf is not in the base model (added by the injection)."""
    return self.injection is not None and self.injection.is_added(path)

  def describe(self) -> str:
    """E.g. 'injection (ia3 on key,value,mlp_hidden)'."""
    if self.injection is None:
      return self.mode
    return (
      f'{self.mode} ({self.injection.method.name} on '
      f'{",".join(self.injection.targets)})'
    )


def from_config(finetune: Mapping[str, Any]) -> Finetune:
  """The `Finetune` of `config.finetune`, with errors naming the bad key."""
  mode = finetune['mode']
  if mode not in MODES:
    raise ConfigError(f'config.finetune.mode={mode!r}; choose one of {MODES}.')
  patterns = trainable_lib.parse_patterns(finetune.get('trainable'))
  if patterns and mode == 'full':
    raise ConfigError(
      f'config.finetune.trainable={finetune["trainable"]!r} has no effect '
      "with config.finetune.mode='full', where every parameter trains; use "
      "mode='head' to train the head and the leaves it matches."
    )
  if mode != 'injection':
    return Finetune(mode, patterns=patterns)
  options = finetune['injection']
  method = methods.get_method(options['method'], options)
  targets = injection_lib.parse_targets(options['targets'], method)
  return Finetune(mode, injection_lib.Injection(method, targets), patterns)


def presets() -> Dict[str, Dict[str, Any]]:
  """Named fine-tuning setups, as `config.finetune` overrides: 'full',
  'head', 'head-mlp' (a frozen model with an MLP head), and one per
  registered injection method, on its default targets."""
  named = {
    'full': {'mode': 'full'},
    'head': {'mode': 'head'},
    'head-mlp': {'mode': 'head', 'head': {'type': 'mlp'}},
  }
  named.update(
    {
      name: {'mode': 'injection', 'injection': {'method': name}}
      for name in sorted(methods.METHODS)
    }
  )
  return named


def head_options(finetune: Mapping[str, Any]) -> Dict[str, Any]:
  """Model keyword arguments of `config.finetune.head`."""
  head = finetune['head']
  if head['type'] not in HEADS:
    raise ConfigError(
      f'config.finetune.head.type={head["type"]!r}; choose one of {HEADS}.'
    )
  if head['type'] == 'linear':
    return {}
  return {
    'head_mlp_dim': int(head['mlp_dim']),
    'head_dropout_rate': float(head['dropout']),
  }


def build_model(
  config: Mapping[str, Any], num_classes: int, fine: Optional[Finetune] = None
) -> Model:
  """The model `config` trains: architecture, head, dtype and injection.

  `fine` is `from_config(config['finetune'])`, if the caller already has it.
  """
  model = models.build_model(
    config['model'],
    num_classes=num_classes,
    dtype=jnp.dtype(config['dtype']),
    **head_options(config['finetune']),
  )
  return (fine or from_config(config['finetune'])).wrap(model)
