"""Every value of a training config, checked before anything is built.

`check(config)` runs first in `train.train_and_evaluate`: a value out of
range, of the wrong type or not among its choices stops the run with a
`ConfigError` naming the key the user sets (`config.pp.crop`, not the
`eval_shift` bound derived from it) and what it accepts, before any data
is read or any model is built. The ranges are one table, `RULES`, in the
order they are checked: the keys users set come before those that configs
derive from them (`configs/scratch.py` derives `warmup_steps` from
`total_steps`), so the error names the value the user typed.

Rules that span keys follow the table: the evaluation shift within the
crop, the preprocessing, engine and mixing options, the per-parameter
optimizer settings (`lr_mults`, `wd_mults`), whether the model's patches
tile the crop, the few-shot counts and the fine-tuning mode.
Checks that need the dataset (few-shot counts against the smallest class,
`fewshot.Evaluator`) or the initialised model (injection targets,
`finetune.injection`) run where those first exist, still before the first
step.
"""

import dataclasses
import math
import numbers
import re
from typing import Any, Callable, Dict, Sequence, Tuple

import ml_collections

from vit_jax import engine as engine_lib
from vit_jax import finetune
from vit_jax import lifecycle
from vit_jax import mixing
from vit_jax import models
from vit_jax import optim
from vit_jax import views
from vit_jax.errors import ConfigError
from vit_jax.input_pipeline import preprocess
from vit_jax.input_pipeline import randaugment

DTYPES = ('float32', 'bfloat16')
_INTERVAL = re.compile(r'^([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])$')


@dataclasses.dataclass(frozen=True)
class Rule:
  """The values one config key accepts.

  Attributes:
    kind: 'int', 'number' (an int or a float), 'bool', 'choice' or
      'tuple'.
    low, high: bounds of the range of 'int' and 'number' (inf: none).
    low_open, high_open: whether the bound itself is excluded.
    choices: the values of a 'choice'.
    parts: the rules of a 'tuple''s items, in order.
    optional: whether None (the feature off) is accepted.
    why: what the value means, to say in the error.
  """

  kind: str
  low: float = -math.inf
  high: float = math.inf
  low_open: bool = True
  high_open: bool = True
  choices: Tuple[Any, ...] = ()
  parts: Tuple['Rule', ...] = ()
  optional: bool = False
  why: str = ''

  def accepts(self, value: Any) -> bool:
    """Whether `value` has the rule's type and lies in its range."""
    if value is None:
      return self.optional
    if self.kind == 'choice':
      return value in self.choices
    if self.kind == 'bool':
      return isinstance(value, bool)
    if self.kind == 'tuple':
      return (
        isinstance(value, (tuple, list))
        and len(value) == len(self.parts)
        and all(rule.accepts(v) for rule, v in zip(self.parts, value))
      )
    wanted = numbers.Integral if self.kind == 'int' else numbers.Real
    if isinstance(value, bool) or not isinstance(value, wanted):
      return False
    above = value > self.low if self.low_open else value >= self.low
    below = value < self.high if self.high_open else value <= self.high
    return above and below

  def expectation(self) -> str:
    """'an integer >= 1', 'a number in [0, 1)', 'one of (...)'..."""
    if self.kind == 'choice':
      text = f'one of {self.choices}'
    elif self.kind == 'bool':
      text = 'True or False'
    elif self.kind == 'tuple':
      text = f'({", ".join(rule.expectation() for rule in self.parts)})'
    else:
      text = 'an integer' if self.kind == 'int' else 'a number'
      text += _range_text(self)
    return f'{text} or None' if self.optional else text


def _range_text(rule: Rule) -> str:
  """' >= 1', ' in [0, 1)', or '' for an unbounded range."""
  if rule.high == math.inf:
    if rule.low == -math.inf:
      return ''
    return f' {">" if rule.low_open else ">="} {rule.low:g}'
  if rule.low == -math.inf:
    return f' {"<" if rule.high_open else "<="} {rule.high:g}'
  return (
    f' in {"(" if rule.low_open else "["}{rule.low:g}, {rule.high:g}'
    f'{")" if rule.high_open else "]"}'
  )


def _ranged(kind: str, interval: str, why: str, optional: bool) -> Rule:
  """A rule of `kind` over an interval written as in maths: '[0, 1)',
  '(0, inf)'."""
  match = _INTERVAL.match(interval)
  if match is None:
    raise ValueError(f'Bad interval {interval!r}; write e.g. "[0, 1)".')
  opening, low, high, closing = match.groups()
  return Rule(
    kind,
    low=float(low),
    high=float(high),
    low_open=opening == '(',
    high_open=closing == ')',
    optional=optional,
    why=why,
  )


def integer(interval: str, why: str = '', optional: bool = False) -> Rule:
  """An integer in `interval` ('[1, inf)')."""
  return _ranged('int', interval, why, optional)


def number(interval: str, why: str = '', optional: bool = False) -> Rule:
  """An int or float in `interval` ('[0, 1)'); NaN is in none."""
  return _ranged('number', interval, why, optional)


def choice(choices: Sequence[Any], why: str = '') -> Rule:
  """One of `choices`."""
  return Rule('choice', choices=tuple(choices), why=why)


def boolean(why: str = '') -> Rule:
  """True or False."""
  return Rule('bool', why=why)


def pair(
  first: Rule, second: Rule, why: str = '', optional: bool = False
) -> Rule:
  """Two values (a tuple, or a list as JSON gives it), each accepted by
  its rule."""
  return Rule('tuple', parts=(first, second), optional=optional, why=why)


# What each key accepts, in the order checked (`configs/common.py` says
# what each means). The intervals (total_steps, progress_every,
# eval_every, checkpoint_every) are `lifecycle.Intervals`', checked before
# these. A key a config lacks is not checked (the model's keys differ
# between families).
RULES: Dict[str, Rule] = {
  'seed': integer('(-inf, inf)', 'seeds initialisation, dropout, shuffling'),
  'batch': integer('[1, inf)', 'images per training step, all devices'),
  'batch_eval': integer('[1, inf)', 'images per evaluation batch'),
  'accum_steps': integer('[1, inf)', 'micro-batches per step; 1: none'),
  'base_lr': number(
    '[0, inf)', 'the peak learning rate, e.g. 0.03 for SGD, 1e-3 for AdamW'
  ),
  'warmup_steps': integer('[0, inf)', 'steps of linear warm-up; 0: none'),
  'decay_type': choice(optim.DECAY_TYPES),
  'optimizer': choice(optim.OPTIMIZERS),
  'weight_decay': number('[0, inf)', "AdamW's decoupled decay; 0: none"),
  'layer_decay': number(
    '[0, 1]', 'the learning-rate ratio of adjacent layers; 0 or 1: off', True
  ),
  'grad_norm_clip': number(
    '(0, inf)', 'the largest global gradient norm; None: no clipping', True
  ),
  'label_smoothing': number(
    '[0, 1)', 'the share of the target spread over all classes; 0: none'
  ),
  'ema_decay': number(
    '[0, 1)', 'decay per step of the weight average; 0: no average'
  ),
  'dtype': choice(DTYPES, "the model's compute dtype"),
  'optim_dtype': choice(DTYPES, "the optimizer's momentum dtype"),
  'shuffle_buffer': integer('[1, inf)', 'examples shuffled; 1: no shuffle'),
  'prefetch': integer('[0, inf)', 'batches placed ahead; 0: none'),
  'cpu_devices': integer('[0, inf)', 'CPU devices; 0: one per core'),
  'fsdp_min_size': integer('[0, inf)', 'smaller leaves are replicated'),
  'tfds_download': boolean(),
  'resume_anyway': boolean(),
  'distributed': boolean(),
  'fsdp': boolean(),
  'pp.crop': integer('[1, inf)', 'the image side fed to the model'),
  'pp.pad': integer('[0, inf)', 'the largest shift, in pixels'),
  'pp.rotate': number('[0, 180)', 'the largest rotation, in degrees'),
  'pp.scale': number('[0, 1)', 'the largest relative zoom'),
  'pp.shear': number('[0, 90)', 'the largest shear, in degrees'),
  'pp.elastic': number('[0, inf)', 'the elastic distortion; 0: none'),
  'pp.elastic_sigma': number('(0, inf)', 'the blur of the distortion'),
  'pp.flip': boolean(),
  'pp.randaug': pair(
    integer('[0, inf)'),
    number(f'[0, {randaugment.MAX_MAGNITUDE:g}]'),
    "RandAugment's (num_layers, magnitude), e.g. (2, 10); None: off",
    optional=True,
  ),
  'eval_shift': integer('[0, inf)', 'pixels of test-time shifts; 0: none'),
  'mix.mixup_alpha': number('[0, inf)', "Mixup's Beta(alpha, alpha); 0: off"),
  'mix.mixup_p': number('[0, inf)', "big_vision's Mixup Beta(p, p); 0: off"),
  'mix.cutmix_alpha': number('[0, inf)', "CutMix's Beta(alpha, alpha)"),
  'mix.switch_prob': number('[0, 1]', 'the share of batches given CutMix'),
  'mix.prob': number('[0, 1]', 'the share of batches mixed'),
  'random_erase.prob': number('[0, 1]', 'the share of images erased'),
  'random_erase.area_min': number('(0, 1]', 'the least share erased'),
  'random_erase.area_max': number('(0, 1]', 'the largest share erased'),
  'fewshot.l2_reg': number('(0, inf)', 'the ridge penalty, e.g. 0.1'),
  'finetune.cache_features': boolean(),
  'finetune.head.mlp_dim': integer('[1, inf)', "the MLP head's width"),
  'finetune.head.dropout': number('[0, 1)', "the MLP head's dropout rate"),
  'finetune.injection.rank': integer('[1, inf)', "LoRA's rank"),
  'finetune.injection.alpha': number('(0, inf)', "LoRA's scale alpha/rank"),
  'model.transformer.dropout_rate': number('[0, 1)', 'a dropout rate'),
  'model.transformer.attention_dropout_rate': number(
    '[0, 1)', 'a dropout rate'
  ),
  'model.transformer.stochastic_depth': number(
    '[0, 1)', "the last block's drop-path rate; 0: off"
  ),
  'model.stochastic_depth': number(
    '[0, 1)', "the last block's drop-path rate; 0: off"
  ),
  'model.dropout_rate': number('[0, 1)', 'a dropout rate'),
  'model.attention_dropout_rate': number('[0, 1)', 'a dropout rate'),
  'model.representation_size': integer(
    '[1, inf)', 'the pre-logits width; None: no pre-logits layer', True
  ),
}

_MISSING = object()


def lookup(config: ml_collections.ConfigDict, key: str) -> Any:
  """`config`'s value at the dotted `key`; `_MISSING` where the key, or a
  parent, is absent or None."""
  node = config
  for part in key.split('.'):
    if node is None or not hasattr(node, 'get'):
      return _MISSING
    node = node.get(part, _MISSING)
    if node is _MISSING:
      return _MISSING
  return node


def check_rule(key: str, rule: Rule, value: Any) -> None:
  """A ConfigError naming `config.{key}` unless `rule` accepts `value`."""
  if rule.accepts(value):
    return
  why = f' ({rule.why})' if rule.why else ''
  raise ConfigError(
    f'config.{key}={value!r} must be {rule.expectation()}{why}.'
  )


def check_table(
  config: ml_collections.ConfigDict, rules: Dict[str, Rule] = RULES
) -> None:
  """Checks each key of `rules` that `config` holds, in order."""
  for key, rule in rules.items():
    value = lookup(config, key)
    if value is not _MISSING:
      check_rule(key, rule, value)


def check_fewshot_shots(shots: Any) -> None:
  """A ConfigError naming config.fewshot.shots unless it is a sequence of
  positive integers (empty: no few-shot evaluation)."""
  valid = isinstance(shots, (tuple, list)) and all(
    isinstance(k, numbers.Integral) and not isinstance(k, bool) and k >= 1
    for k in shots
  )
  if not valid:
    raise ConfigError(
      f'config.fewshot.shots={shots!r}; give positive numbers of training '
      'images per class, e.g. (1, 5, 10, 25), or () for none.'
    )


def _patch_pair(value: Any, key: str) -> Tuple[int, int]:
  """(rows, columns) of a patch size; a ConfigError naming `key` unless
  it is two positive integers."""
  pair = tuple(value) if isinstance(value, (tuple, list)) else (value,)
  if len(pair) != 2 or not all(
    isinstance(p, numbers.Integral) and not isinstance(p, bool) and p >= 1
    for p in pair
  ):
    raise ConfigError(
      f'config.{key}={value!r} must be two positive integers (rows, '
      f'columns), e.g. --config.{key}="(16, 16)".'
    )
  return int(pair[0]), int(pair[1])


def _halved(side: int, times: int) -> int:
  """`side` after `times` stride-2 'SAME' layers (each rounds up)."""
  for _ in range(times):
    side = -(-side // 2)
  return side


def _stem(model: ml_collections.ConfigDict) -> Tuple[int, str]:
  """How many stride-2 layers a ViT runs before its patch embedding, and
  their name for messages (' through the ResNet root', or '')."""
  strides, parts = 0, []
  resnet = model.get('resnet')
  if resnet is not None:
    # conv_root and the max-pool, then each stage but the first.
    strides += 2 + max(len(resnet['num_layers']) - 1, 0)
    parts.append('the ResNet root')
  conv_stem = model.get('conv_stem') or ()
  if conv_stem:
    strides += len(conv_stem)
    parts.append(f'{len(conv_stem)} stride-2 convolutions')
  return strides, f' through {" and ".join(parts)}' if parts else ''


def _nearest(crop: int, fits: Callable[[int], bool]) -> str:
  """The nearest crops below and above `crop` that `fits`, as 'A or B'."""
  below = next((c for c in range(crop - 1, 0, -1) if fits(c)), None)
  above = next((c for c in range(crop + 1, 4 * crop + 64) if fits(c)), None)
  return ' or '.join(str(c) for c in (below, above) if c is not None)


def check_vit_patches(model: ml_collections.ConfigDict, crop: int) -> None:
  """A ConfigError unless the patches of a ViT (plain, hybrid or with a
  convolutional stem) tile what they embed: with 'VALID' patches (vit_jax's)
  the embedding drops the rows and columns past the last whole patch, up to
  44% of the pixels, silently. A Mixer's patches pad instead ('SAME')."""
  patches = model['patches']
  ph, pw = _patch_pair(patches.get('size'), 'model.patches.size')
  padding = patches.get('padding', 'VALID')
  if padding not in ('VALID', 'SAME'):
    raise ConfigError(
      f"config.model.patches.padding={padding!r}; use 'VALID' (drops a "
      "partial patch, vit_jax's) or 'SAME' (pads it)."
    )
  if (
    padding == 'SAME'
    or models.model_class(model.get('model_name') or '')
    is not models.VisionTransformer
  ):
    return
  strides, through = _stem(model)

  def fits(c: int) -> bool:
    side = _halved(c, strides)
    return side >= max(ph, pw) and not side % ph and not side % pw

  if fits(crop):
    return
  side = _halved(crop, strides)
  grid = f'{side // ph}x{side // pw}'
  start = (
    f'Images of {crop}x{crop} pixels give a {grid} token grid{through} '
    f'with {ph}x{pw} patches'
  )
  if side < max(ph, pw):
    raise ConfigError(
      f'{start}; feed larger images (config.pp.crop) or use smaller '
      'patches (config.model.patches.size).'
    )
  what = f'the {side}x{side} features' if through else 'every image'
  raise ConfigError(
    f'{start}, which drop the last {side % ph} rows and {side % pw} columns '
    f'of {what}; set config.pp.crop to {_nearest(crop, fits)}, or '
    f'config.model.patches.size to divisors of {side}.'
  )


def swin_problem(crop: int, patch: int, window: int, stages: int) -> str:
  """Why a Swin with `stages` stages cannot take `crop`-pixel images ('':
  it can): its patches must tile the image, each patch merging halves an
  even grid, and each stage's grid splits into whole windows."""
  if crop % patch:
    return (
      f'its {patch}x{patch} patches drop the last {crop % patch} rows and '
      'columns of every image'
    )
  grid = crop // patch
  for stage in range(stages):
    if stage:
      if grid % 2:
        return f'stage {stage} cannot merge the odd {grid}x{grid} grid'
      grid //= 2
    size = min(window, grid)
    if grid % size:
      return (
        f'the {grid}x{grid} grid of stage {stage} does not split into '
        f'{size}x{size} windows'
      )
  return ''


def check_swin(model: ml_collections.ConfigDict, crop: int) -> None:
  """A ConfigError naming the crop, patch size and window unless a Swin's
  patches, patch merging and windows fit `crop`."""
  for key, why in (('patch_size', 'pixels'), ('window_size', 'tokens')):
    check_rule(f'model.{key}', integer('[1, inf)', why), model.get(key))
  patch, window = model['patch_size'], model['window_size']
  stages = len(model.get('depths') or ())
  problem = swin_problem(crop, patch, window, stages)
  if not problem:
    return
  fits = _nearest(crop, lambda c: not swin_problem(c, patch, window, stages))
  raise ConfigError(
    f'config.pp.crop={crop} does not fit this Swin '
    f'(config.model.patch_size={patch}, config.model.window_size={window}): '
    f'{problem}; set config.pp.crop to {fits}.'
  )


def check_model(config: ml_collections.ConfigDict) -> None:
  """A ConfigError unless `config.model` is set and, for the families with
  patches (ViT and hybrids, Mixer, Swin), they fit `config.pp.crop`.
  ResNets take any crop."""
  model = config.get('model')
  if model is None:
    raise ConfigError(
      'config.model is not set; choose one, e.g. '
      '--config=configs/vit.py:b16,cifar10.'
    )
  crop = config['pp']['crop']
  if 'patch_size' in model:
    check_swin(model, crop)
  elif model.get('patches') is not None:
    check_vit_patches(model, crop)


def check(config: ml_collections.ConfigDict) -> None:
  """Raises a ConfigError naming the first key of `config` out of range,
  of the wrong type or inconsistent with another, before anything is
  built. `config.pp` must be complete (`train.with_complete_pp`).

  The run's intervals come first (total_steps before the warm-up that
  configs derive from it), then `RULES`, then the rules across keys.
  """
  lifecycle.Intervals.from_config(config)
  check_table(config)
  views.check_eval_shift(config.eval_shift, config.pp.crop)
  preprocess.check_pp(config.pp)
  engine_lib.check_config(config)
  mixing.check_config(config)
  optim.check_config(config)
  check_fewshot_shots(config.fewshot.shots)
  check_model(config)
  finetune.from_config(config.finetune)
