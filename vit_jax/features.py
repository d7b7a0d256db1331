"""A model's pre-logits features of a whole split, computed on the host.

Two users: few-shot linear evaluation (`vit_jax.fewshot`), and head-only
training on cached features (`config.finetune.cache_features`), where the
frozen encoder runs once over the training split instead of at every step.
"""

from typing import Any, Callable, Iterator, Tuple

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from vit_jax import input_pipeline
from vit_jax import mixing
from vit_jax import trainable as trainable_lib
from vit_jax.errors import ConfigError
from vit_jax.models import heads


def examples(
  data: input_pipeline.EvalData,
) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
  """`(images, labels)` of the real examples of each masked batch of
  `data`, its devices' shares merged."""
  for batch in data.dataset.as_numpy_iterator():
    mask = batch['mask'].reshape(-1)
    yield (
      batch['image'].reshape(-1, *batch['image'].shape[2:])[mask],
      batch['label'].reshape(-1)[mask],
    )


def extractor(model: nn.Module) -> Callable[[Any, np.ndarray], np.ndarray]:
  """`extract(params, images)`: host features of `model` (compiled once per
  batch shape, on the default device)."""
  compiled = jax.jit(lambda params, x: heads.head_inputs(model, params, x))
  return lambda params, images: np.asarray(
    jax.device_get(compiled(params, images))
  )


def of_split(
  extract: Callable[[Any, np.ndarray], np.ndarray],
  params: Any,
  data: input_pipeline.EvalData,
) -> Tuple[np.ndarray, np.ndarray]:
  """`(features [n, d], labels [n])` of every example of `data`, by an
  `extractor`'s `extract`."""
  features, labels = [], []
  for images, batch_labels in examples(data):
    features.append(extract(params, images))
    labels.append(batch_labels)
  return np.concatenate(features), np.concatenate(labels)


def check_cacheable(
  config: ml_collections.ConfigDict,
  model: nn.Module,
  params: Any,
  is_trainable: Callable[[str], bool],
) -> None:
  """ConfigErrors where training on cached features would differ from
  training on images: augmented (RandAugment too), flipped, mixed or
  erased input, a trainable leaf outside the head, or an encoder that is
  random in training mode (dropout)."""
  key = 'config.finetune.cache_features'
  if config.pp.augment != 'none' or config.pp.flip:
    raise ConfigError(
      f'{key}=True needs the same input at every epoch, but '
      f'config.pp.augment={config.pp.augment!r}, config.pp.flip='
      f'{config.pp.flip}; set --config.pp.augment=none '
      '--config.pp.flip=False, or drop the cache.'
    )
  randaug = config.pp.get('randaug')
  if randaug and randaug[0]:
    raise ConfigError(
      f'{key}=True needs the same input at every epoch, but '
      f'config.pp.randaug={tuple(randaug)}; leave it unset (None), or drop '
      'the cache.'
    )
  if mixing.active(config):
    raise ConfigError(
      f'{key}=True needs the same input at every epoch, but the batches '
      f'are changed by {", ".join(mixing.active(config))} (config.mix, '
      'config.random_erase); turn them off, or drop the cache.'
    )
  outside = [
    path
    for path in trainable_lib.paths(params)
    if is_trainable(path) and not trainable_lib.is_head(path)
  ]
  if outside:
    raise ConfigError(
      f'{key}=True trains the head only, but {outside[0]} (and '
      f'{len(outside) - 1} more) also train here; use '
      "config.finetune.mode='head' without config.finetune.trainable."
    )
  images = (
    np.random.default_rng(0)
    .uniform(-1, 1, (2, config.pp.crop, config.pp.crop, 3))
    .astype(np.float32)
  )
  evaluation = heads.head_inputs(model, params, images)
  training = heads.head_inputs(
    model, params, images, train=True, rngs={'dropout': jax.random.key(0)}
  )
  if not np.array_equal(np.asarray(evaluation), np.asarray(training)):
    raise ConfigError(
      f'{key}=True: the frozen encoder of {config.model.model_name} is '
      'random in training mode (dropout), so its features change from '
      'step to step; set its dropout rates to 0, or drop the cache.'
    )
