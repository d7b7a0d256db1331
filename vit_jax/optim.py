"""Learning-rate schedules and optimizers, from explicit settings.

Schedules are vit_jax's `create_learning_rate_schedule`: a linear warm-up
from 0 to `base_lr`, then cosine, linear or constant decay. Optimizers are
SGD with momentum (vit_jax) or AdamW, both after clipping the global
gradient norm. `moment_dtype` is the dtype of the first-moment state (SGD
momentum, Adam's mu): bfloat16 halves the optimizer's memory, as vit_jax's
`optim_dtype` intends.

The optimizer is built for, and applied to, the trainable sub-tree only
(`trainable.partition`): frozen leaves have no optimizer state and are
never updated.

Per-parameter control (`Multipliers`), by the leaves' '/'-joined paths:
layer-wise learning-rate decay (`config.layer_decay`, BEiT's) and regular
expressions (`config.lr_mults`, `config.wd_mults`, big_vision's) scale the
update or the weight decay of each trainable leaf. Off (the defaults), the
optimizer is the one built without them, its updates and state unchanged.
"""

import dataclasses
import math
import numbers
import re
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Union

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vit_jax import trainable as trainable_lib
from vit_jax.errors import ConfigError

DECAY_TYPES = ('cosine', 'linear', 'constant')
# Where vit_jax's linear decay ends (`linear_end` of its
# `create_learning_rate_schedule`), whatever base_lr is.
LINEAR_END = 1e-5
OPTIMIZERS = ('sgd', 'adamw')
# A multiplier of one leaf: a number, or for the stacked blocks of a scanned
# encoder one number per layer (along the leaf's leading axis).
Factor = Union[float, np.ndarray]
# Paths of a ViT's embedding (patch embedding, class token, position
# embeddings, and a hybrid's ResNet root or a convolutional stem): layer 0.
_EMBEDDING = re.compile(
  r'(embedding|cls|Transformer/posembed_input|conv_root|gn_root|block\d+'
  r'|stem_conv\d+|stem_norm\d+)(/.*)?'
)
_BLOCK = re.compile(r'Transformer/encoderblock_(\d+)/.*')
# The scanned blocks (`vit.SCANNED_BLOCK`), stacked over the layers.
_STACKED_BLOCKS = 'Transformer/encoderblock/'


def learning_rate_schedule(
  *,
  base_lr: float,
  total_steps: int,
  warmup_steps: int,
  decay_type: str = 'cosine',
  linear_end: float = LINEAR_END,
) -> optax.Schedule:
  """0 at step 0, `base_lr` after `warmup_steps`, then decayed: to 0 at the
  end (cosine), to `linear_end` (linear), or not at all (constant).

  A run no longer than its warm-up (e.g. vit_jax's one-step test with the
  default 500 warm-up steps) warms up throughout: the rate rises as
  `base_lr * step / warmup_steps` and never decays (vit_jax's formula runs
  such a cosine schedule at 0), with a warning.
  """
  if decay_type not in DECAY_TYPES:
    raise ConfigError(
      f'config.decay_type={decay_type!r}; choose one of {DECAY_TYPES}.'
    )
  if warmup_steps < 0:
    raise ConfigError(f'config.warmup_steps={warmup_steps} must be >= 0.')
  warmup = optax.linear_schedule(0.0, base_lr, warmup_steps)
  if warmup_steps >= total_steps:
    logging.warning(
      'config.warmup_steps=%d >= config.total_steps=%d: the learning rate '
      'warms up throughout and ends at %g, below base_lr=%g.',
      warmup_steps,
      total_steps,
      base_lr * total_steps / warmup_steps,
      base_lr,
    )
    return warmup
  decay_steps = total_steps - warmup_steps
  decay = {
    'cosine': optax.cosine_decay_schedule(base_lr, decay_steps),
    'linear': optax.linear_schedule(base_lr, linear_end, decay_steps),
    'constant': optax.constant_schedule(base_lr),
  }[decay_type]
  if not warmup_steps:
    return decay
  return optax.join_schedules([warmup, decay], [warmup_steps])


# `models.vit.SCANNED_BLOCK`: a scanned encoder stacks its blocks' leaves
# under this name, along a leading axis of layers.
_STACKED_BLOCK = 'encoderblock'


def _decays(path: str, leaf: Any) -> bool:
  """Whether AdamW decays the leaf at '/'-joined `path`: weight matrices
  and embeddings, not biases or norm scales, i.e. leaves of more than one
  dimension per layer (a scanned encoder's stacked biases are 2-D, one row
  per layer, and are not decayed either)."""
  stacked = f'/{_STACKED_BLOCK}/' in f'/{path}/'
  return leaf.ndim - int(stacked) > 1


def _decayed(params):
  """AdamW's decay mask over `params` (`_decays`)."""
  return _map_paths(_decays, params)


def vit_layer_id(path: str, num_layers: int) -> Union[int, np.ndarray]:
  """BEiT's layer id of a ViT parameter (Bao et al., 2021, its
  `get_num_layer_for_vit`): 0 for the embedding (patch embedding, class
  token, position embeddings; a hybrid's ResNet root, a convolutional
  stem), i + 1 for `Transformer/encoderblock_{i}`, and `num_layers` + 1
  for everything after the blocks (the final `encoder_norm`, `pre_logits`,
  the head). The stacked blocks of a scanned encoder get 1 .. num_layers
  along their leading axis."""
  if _EMBEDDING.fullmatch(path):
    return 0
  block = _BLOCK.fullmatch(path)
  if block:
    return int(block.group(1)) + 1
  if path.startswith(_STACKED_BLOCKS):
    return np.arange(1, num_layers + 1)
  return num_layers + 1


def parse_mults(value: Any, knob: str) -> Tuple[Tuple[re.Pattern, float], ...]:
  """The compiled `(regex, multiplier)` pairs of `config.lr_mults` or
  `config.wd_mults` (`knob`): a sequence of pairs, () for none.

  Raises:
    ConfigError: naming `knob`, for an entry that is not a pair of a
      regular expression and a finite number >= 0.
  """
  if not value:
    return ()
  if isinstance(value, str) or not isinstance(value, Sequence):
    value = [value]
  pairs = []
  for item in value:
    if not (
      isinstance(item, Sequence)
      and len(item) == 2
      and isinstance(item[0], str)
      and isinstance(item[1], numbers.Real)
      and not isinstance(item[1], bool)
      and math.isfinite(item[1])
      and item[1] >= 0
    ):
      raise ConfigError(
        f'{knob}: {item!r} is not a (regular expression, multiplier >= 0) '
        f'pair; write e.g. --{knob}="((\'head/.*\', 10.0),)".'
      )
    (pattern,) = trainable_lib.parse_patterns([item[0]], knob)
    pairs.append((pattern, float(item[1])))
  return tuple(pairs)


@dataclasses.dataclass(frozen=True)
class Multipliers:
  """The factor of each leaf, from its '/'-joined path: the product of
  BEiT's layer-wise decay, `layer_decay ** (num_layers + 1 -
  vit_layer_id(path))` (the embedding decay^(L+1), block i decay^(L-i),
  the head and final norm 1), and the multiplier of the first of `rules`
  whose regular expression matches the whole path (big_vision's
  `lr_mults`/`wd_mults`; 1 if none does).

  Attributes:
    knob: the config key of `rules`, for messages.
    rules: `(regex, multiplier)` pairs, see `parse_mults`.
    layer_decay: the ratio between adjacent layers; None: no decay.
    num_layers: the ViT's depth L, with `layer_decay`.
  """

  knob: str
  rules: Tuple[Tuple[re.Pattern, float], ...] = ()
  layer_decay: Optional[float] = None
  num_layers: int = 0

  def __call__(self, path: str) -> Factor:
    factor = next((m for p, m in self.rules if p.fullmatch(path)), 1.0)
    if self.layer_decay is None:
      return factor
    depth = self.num_layers + 1 - vit_layer_id(path, self.num_layers)
    return factor * self.layer_decay**depth

  def report(self, params: Any) -> None:
    """Logs each leaf's factor other than 1; warns of a rule matching no
    leaf of `params` (the trainable ones: a frozen leaf has no factor)."""
    paths = trainable_lib.paths(params)
    for pattern, _ in self.rules:
      if not any(pattern.fullmatch(path) for path in paths):
        logging.warning(
          '%s: %r matches no trainable parameter; paths look like %s.',
          self.knob,
          pattern.pattern,
          paths[:3],
        )
    for path in paths:
      factor = np.asarray(self(path))
      if np.any(factor != 1):
        logging.info('%s: %s x %s', self.knob, path, factor.tolist())


def _scaled(x: jax.Array, factor: Factor) -> jax.Array:
  """`x` times `factor` in `x`'s dtype; a per-layer factor scales the
  leading (layer) axis; `x` itself where the factor is 1."""
  factor = np.asarray(factor, np.float64)
  if np.all(factor == 1):
    return x
  shape = factor.shape + (1,) * (x.ndim - factor.ndim)
  return x * jnp.asarray(factor.reshape(shape), x.dtype)


def _map_paths(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
  """`fn(path, leaf, *rest_leaves)` over `tree`, `path` '/'-joined."""

  def name(key: Any) -> str:
    return str(getattr(key, 'key', getattr(key, 'name', key)))

  return jax.tree_util.tree_map_with_path(
    lambda keys, *leaves: fn('/'.join(map(name, keys)), *leaves), tree, *rest
  )


def scale_by_path(multipliers: Multipliers) -> optax.GradientTransformation:
  """Multiplies each leaf's update by `multipliers(path)`: after the
  optimizer's learning rate, a per-leaf learning rate (its weight decay,
  which AdamW adds before the learning rate, included, as in PyTorch's
  parameter groups). Stateless."""

  def init(params):
    multipliers.report(params)
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    return _map_paths(
      lambda path, u: _scaled(u, multipliers(path)), updates
    ), state

  return optax.GradientTransformation(init, update)


def add_decayed_weights_by_path(
  weight_decay: float, multipliers: Multipliers
) -> optax.GradientTransformation:
  """`optax.add_decayed_weights` on the leaves AdamW decays (`_decayed`),
  each leaf's decay scaled by `multipliers(path)`: the decay term only,
  not the gradient's step. Stateless."""

  def init(params):
    multipliers.report(params)
    return optax.EmptyState()

  def update(updates, state, params=None):
    if params is None:
      raise ValueError('add_decayed_weights_by_path needs the params.')

    def decay(path, u, p):
      if not _decays(path, p):
        return u
      return u + _scaled(p, weight_decay * np.asarray(multipliers(path)))

    return _map_paths(decay, updates, params), state

  return optax.GradientTransformation(init, update)


def _adamw(
  schedule: optax.Schedule,
  weight_decay: float,
  mu_dtype: Any,
  wd_mults: Optional[Multipliers],
) -> optax.GradientTransformation:
  """`optax.adamw` with decay on `_decayed` leaves; with `wd_mults`, the
  same chain (Adam's scaling, the decay, the learning rate) with each
  leaf's decay scaled."""
  if wd_mults is None:
    return optax.adamw(
      schedule, weight_decay=weight_decay, mu_dtype=mu_dtype, mask=_decayed
    )
  return optax.chain(
    optax.scale_by_adam(mu_dtype=mu_dtype),
    add_decayed_weights_by_path(weight_decay, wd_mults),
    optax.scale_by_learning_rate(schedule),
  )


def make_optimizer(
  name: str,
  schedule: optax.Schedule,
  *,
  weight_decay: float = 0.0,
  grad_norm_clip: float | None = None,
  moment_dtype: str = 'float32',
  lr_mults: Optional[Multipliers] = None,
  wd_mults: Optional[Multipliers] = None,
) -> optax.GradientTransformation:
  """SGD with momentum 0.9 or AdamW following `schedule`, after clipping.

  Args:
    name: 'sgd' or 'adamw' (`config.optimizer`).
    schedule: learning rate per step.
    weight_decay: AdamW's decoupled weight decay (unused by SGD).
    grad_norm_clip: the global gradient norm is clipped to this; None for
      no clipping.
    moment_dtype: dtype of the momentum / first-moment state.
    lr_mults: per-leaf learning-rate factors (`scale_by_path`, last in
      the chain); None: none, the chain as without them.
    wd_mults: per-leaf factors of AdamW's weight decay
      (`add_decayed_weights_by_path`); None: none.
  """
  dtype = jnp.dtype(moment_dtype)
  _check_wd_mults(name, wd_mults)
  if name == 'sgd':
    optimizer = optax.sgd(schedule, momentum=0.9, accumulator_dtype=dtype)
  elif name == 'adamw':
    optimizer = _adamw(schedule, weight_decay, dtype, wd_mults)
  else:
    raise ConfigError(f'config.optimizer={name!r}; choose one of {OPTIMIZERS}.')
  if lr_mults is not None:
    optimizer = optax.chain(optimizer, scale_by_path(lr_mults))
  if grad_norm_clip is None:
    return optimizer
  return optax.chain(optax.clip_by_global_norm(grad_norm_clip), optimizer)


def _check_wd_mults(name: str, wd_mults: Optional[Multipliers]) -> None:
  """A ConfigError for weight-decay factors of an optimizer without
  weight decay (SGD), where they would silently do nothing."""
  if wd_mults is not None and name == 'sgd':
    raise ConfigError(
      f"{wd_mults.knob} scales AdamW's weight decay, and "
      "config.optimizer='sgd' has none; set it to () or use 'adamw'."
    )


def check_config(config: Mapping[str, Any]) -> None:
  """The ConfigErrors of `from_config`'s per-parameter settings, before
  anything is built: `lr_mults`/`wd_mults` entries that are not (regular
  expression, multiplier >= 0) pairs, `layer_decay` without a ViT,
  `wd_mults` with SGD."""
  _, wd_mults = multipliers_from_config(config)
  _check_wd_mults(config['optimizer'], wd_mults)


def layer_decay_of(config: Mapping[str, Any]) -> Optional[float]:
  """`config.layer_decay`, None where it is off (None, 0 or 1)."""
  decay = config.get('layer_decay')
  return None if decay in (None, 0, 1) else float(decay)


def multipliers_from_config(
  config: Mapping[str, Any],
) -> Tuple[Optional[Multipliers], Optional[Multipliers]]:
  """The learning-rate and weight-decay `Multipliers` of `config.lr_mults`
  with `config.layer_decay`, and of `config.wd_mults`; None for each that
  is off (the defaults). A ConfigError for layer decay on a model without
  a ViT encoder (`config.model.transformer.num_layers`)."""
  lr_rules = parse_mults(config.get('lr_mults'), 'config.lr_mults')
  wd_rules = parse_mults(config.get('wd_mults'), 'config.wd_mults')
  decay = layer_decay_of(config)
  num_layers = 0
  if decay is not None:
    transformer = (config.get('model') or {}).get('transformer') or {}
    if 'num_layers' not in transformer:
      raise ConfigError(
        f'config.layer_decay={decay} needs a ViT (layers of '
        'config.model.transformer.num_layers); this model has none. Set it '
        'to None, or scale its parts with config.lr_mults.'
      )
    num_layers = int(transformer['num_layers'])
  lr_mults = None
  if lr_rules or decay is not None:
    lr_mults = Multipliers('config.lr_mults', lr_rules, decay, num_layers)
  wd_mults = Multipliers('config.wd_mults', wd_rules) if wd_rules else None
  return lr_mults, wd_mults


def from_config(
  config: Mapping[str, Any],
) -> Tuple[optax.Schedule, optax.GradientTransformation]:
  """The schedule and optimizer of an experiment config's optimizer keys
  (`base_lr`, `total_steps`, `warmup_steps`, `decay_type`, `optimizer`,
  `weight_decay`, `grad_norm_clip`, `optim_dtype`; optionally
  `layer_decay`, `lr_mults`, `wd_mults`), so the training job and the
  benchmarks build the same ones."""
  schedule = learning_rate_schedule(
    base_lr=config['base_lr'],
    total_steps=config['total_steps'],
    warmup_steps=config['warmup_steps'],
    decay_type=config['decay_type'],
  )
  lr_mults, wd_mults = multipliers_from_config(config)
  optimizer = make_optimizer(
    config['optimizer'],
    schedule,
    weight_decay=config['weight_decay'],
    grad_norm_clip=config['grad_norm_clip'],
    moment_dtype=config['optim_dtype'],
    lr_mults=lr_mults,
    wd_mults=wd_mults,
  )
  return schedule, optimizer
