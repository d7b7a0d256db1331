"""Fine-tuning modes from the config: which model to build, what trains.

  full       every parameter trains (vit_jax's fine-tuning).
  head       the pre-trained model is frozen; only the head trains.
  injection  the pre-trained model is frozen; a method (`methods`) is
             injected into the encoder and trains with the head.

`config.finetune.head` picks the head in every mode: 'linear' (vit_jax's
Dense) or 'mlp' (`models.heads.MlpHead`).
"""

import dataclasses
from typing import Any, Dict, Mapping, Optional, Union

import flax.linen as nn
import jax.numpy as jnp

from vit_jax import models
from vit_jax.finetune import injection as injection_lib
from vit_jax.finetune import methods

MODES = ('full', 'head', 'injection')
HEADS = ('linear', 'mlp')
HEAD_PREFIX = 'head'

Model = Union[nn.Module, injection_lib.InjectedModel]


def is_head(path: str) -> bool:
  """Whether a leaf belongs to the classification head."""
  return path == HEAD_PREFIX or path.startswith(HEAD_PREFIX + '/')


@dataclasses.dataclass(frozen=True)
class Finetune:
  """A fine-tuning mode, resolved from `config.finetune`.

  Attributes:
    mode: one of `MODES`.
    injection: the injection of mode 'injection', else None.
  """
  mode: str
  injection: Optional[injection_lib.Injection] = None

  def wrap(self, model: nn.Module) -> Model:
    """The model to train: `model`, or `model` with the injection."""
    if self.injection is None:
      return model
    if self.injection.hooks_qkv and getattr(model, 'fused_qkv', False):
      # A fused projection has no query/key/value layer to inject into.
      model = model.clone(fused_qkv=False)
    return injection_lib.InjectedModel(model, self.injection)

  def is_trainable(self, path: str) -> bool:
    """Whether the leaf at `path` trains in this mode."""
    if self.mode == 'full':
      return True
    if is_head(path):
      return True
    return self.injection is not None and self.injection.is_trained(path)

  def is_added(self, path: str) -> bool:
    """Whether the leaf is not in the base model (added by the injection)."""
    return self.injection is not None and self.injection.is_added(path)

  def describe(self) -> str:
    """E.g. 'injection (ia3 on key,value,mlp_hidden)'."""
    if self.injection is None:
      return self.mode
    return (f'{self.mode} ({self.injection.method.name} on '
            f'{",".join(self.injection.targets)})')


def from_config(finetune: Mapping[str, Any]) -> Finetune:
  """The `Finetune` of `config.finetune`, with errors naming the bad key."""
  mode = finetune['mode']
  if mode not in MODES:
    raise ValueError(f'config.finetune.mode={mode!r}; choose one of {MODES}.')
  if mode != 'injection':
    return Finetune(mode)
  options = finetune['injection']
  method = methods.get_method(options['method'], options)
  targets = injection_lib.parse_targets(options['targets'], method)
  return Finetune(mode, injection_lib.Injection(method, targets))


def head_options(finetune: Mapping[str, Any]) -> Dict[str, Any]:
  """Model keyword arguments of `config.finetune.head`."""
  head = finetune['head']
  if head['type'] not in HEADS:
    raise ValueError(
        f'config.finetune.head.type={head["type"]!r}; choose one of {HEADS}.')
  if head['type'] == 'linear':
    return {}
  return {'head_mlp_dim': int(head['mlp_dim']),
          'head_dropout_rate': float(head['dropout'])}


def build_model(config: Mapping[str, Any], num_classes: int,
                fine: Optional[Finetune] = None) -> Model:
  """The model `config` trains: architecture, head, dtype and injection.

  `fine` is `from_config(config['finetune'])`, if the caller already has it.
  """
  model = models.build_model(config['model'], num_classes=num_classes,
                             dtype=jnp.dtype(config['dtype']),
                             **head_options(config['finetune']))
  return (fine or from_config(config['finetune'])).wrap(model)
