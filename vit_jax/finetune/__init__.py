"""Fine-tuning modes: full, head-only, and injected parameter-efficient methods.

  fine = finetune.from_config(config.finetune)     # mode, method, targets
  model = finetune.build_model(config, num_classes)  # injected if configured
  labels = finetune.label_params(params, fine.is_trainable)
  optimizer = optimizers.make_optimizer(config, schedule, labels)

See `modes` (what trains), `methods` (IA³, SSF, LoRA, BitFit and how to add
one), `injection` (how methods enter a model without changing its code, and
folding them back into plain weights), `labels` (the trainable/frozen split
that the optimizer and the train step share) and `serving` (task files on
one shared base).
"""

from vit_jax.finetune.injection import InjectedModel
from vit_jax.finetune.injection import Injection
from vit_jax.finetune.injection import TARGETS
from vit_jax.finetune.labels import FROZEN
from vit_jax.finetune.labels import TRAINABLE
from vit_jax.finetune.labels import label_params
from vit_jax.finetune.methods import METHODS
from vit_jax.finetune.methods import Method
from vit_jax.finetune.methods import register
from vit_jax.finetune.modes import HEADS
from vit_jax.finetune.modes import MODES
from vit_jax.finetune.modes import Finetune
from vit_jax.finetune.modes import build_model
from vit_jax.finetune.modes import from_config

__all__ = [
    'FROZEN', 'Finetune', 'HEADS', 'InjectedModel', 'Injection', 'METHODS',
    'MODES', 'Method', 'TARGETS', 'TRAINABLE', 'build_model', 'from_config',
    'label_params', 'register',
]
