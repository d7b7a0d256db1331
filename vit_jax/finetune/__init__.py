"""Fine-tuning modes: full, head-only, and injected parameter-efficient methods.

  fine = finetune.from_config(config.finetune)  # mode, method, targets
  model = finetune.build_model(config, num_classes, fine)  # injected if set
  fine.is_trainable('head/kernel')  # the run's one decision of what trains

See `modes` (what trains), `methods` (IA³, SSF, LoRA, BitFit and how to add
one), `injection` (how methods enter a model without changing its code, and
folding them back into plain weights) and `serving` (task files on one
shared base). Splitting a tree by `is_trainable` is `vit_jax.trainable`'s.
"""

from vit_jax.finetune.injection import TARGETS
from vit_jax.finetune.injection import InjectedModel
from vit_jax.finetune.injection import Injection
from vit_jax.finetune.methods import METHODS
from vit_jax.finetune.methods import Method
from vit_jax.finetune.methods import register
from vit_jax.finetune.modes import HEADS
from vit_jax.finetune.modes import MODES
from vit_jax.finetune.modes import Finetune
from vit_jax.finetune.modes import build_model
from vit_jax.finetune.modes import from_config

__all__ = [
  'Finetune',
  'HEADS',
  'InjectedModel',
  'Injection',
  'METHODS',
  'MODES',
  'Method',
  'TARGETS',
  'build_model',
  'from_config',
  'register',
]
