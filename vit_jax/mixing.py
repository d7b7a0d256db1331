"""Mixup, CutMix and random erasing: augmentations of a whole batch.

Each op is a pure function of a JAX key and a batch of float images
`[B, H, W, C]` (with labels as targets `[B, classes]`), so it runs on the
device inside the train step, where the embedded data sets spend no host
time on it. `from_config` combines what `config.mix` and
`config.random_erase` turn on into one `BatchTransform`, or None when all
is off (the train step is then the one without a transform).

- Mixup (Zhang et al., *mixup: Beyond empirical risk minimization*, 2018):
  each image becomes lam * itself + (1 - lam) * its neighbour in the batch
  (the batch rolled by one), and so does its target; lam ~ Beta(alpha,
  alpha), one per batch. big_vision's `p` draws the two weights from a
  Dirichlet(p, p), i.e. lam ~ Beta(p, p), and sorts them so that each image
  keeps the larger share: lam = max(lam, 1 - lam).
- CutMix (Yun et al., *CutMix: Regularization strategy to train strong
  classifiers with localizable features*, 2019): a box of the neighbour is
  pasted into each image. lam ~ Beta(alpha, alpha) sets the box's sides,
  H * sqrt(1 - lam) and W * sqrt(1 - lam), around a centre uniform over
  the image; the box is clipped at the borders and the target weighs the
  neighbour by the area actually pasted.
- timm's batch mode chooses between the two: with both on, CutMix with
  probability `switch_prob`, else Mixup; and a batch is mixed at all with
  probability `prob`.
- Random erasing (Zhong et al., *Random erasing data augmentation*, 2020):
  with probability `prob` per image, a rectangle of `area_min` to
  `area_max` of the image, of aspect ratio log-uniform in [0.3, 1/0.3]
  (timm's defaults), is filled with standard normal noise per pixel and
  channel (timm's 'pixel' mode). Images are erased before they are mixed,
  as timm erases in its loader and mixes the batches.
"""

import math
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from vit_jax.errors import ConfigError

# `(key, images, labels) -> (images, targets)`: labels are class indices
# `[B]` or targets `[B, classes]`; the targets returned are float.
BatchTransform = Callable[
  [jax.Array, jnp.ndarray, jnp.ndarray], Tuple[jnp.ndarray, jnp.ndarray]
]

# Random erasing's range of aspect ratios (height / width), timm's.
ERASE_ASPECT = (0.3, 1 / 0.3)
# Rectangles drawn per image until one fits (timm's 10 attempts); an image
# none fits is left as it is.
ERASE_TRIES = 10


def mixup_weight(
  key: jax.Array, alpha: float, larger_own: bool = False
) -> jnp.ndarray:
  """lam ~ Beta(alpha, alpha), the weight of each image's own content;
  with `larger_own`, max(lam, 1 - lam), as big_vision's sorted weights."""
  lam = jax.random.beta(key, alpha, alpha)
  return jnp.maximum(lam, 1 - lam) if larger_own else lam


def blend(x: jnp.ndarray, lam: jnp.ndarray) -> jnp.ndarray:
  """lam * x + (1 - lam) * the neighbour's (x rolled by one along the
  batch), for images and targets alike."""
  lam = jnp.asarray(lam, x.dtype)
  return lam * x + (1 - lam) * jnp.roll(x, 1, axis=0)


def mixup(
  key: jax.Array,
  images: jnp.ndarray,
  targets: jnp.ndarray,
  alpha: float,
  larger_own: bool = False,
) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Mixup: images and targets blended with their neighbours, by one lam
  drawn from `key` (`mixup_weight`)."""
  lam = mixup_weight(key, alpha, larger_own)
  return blend(images, lam), blend(targets, lam)


def _span(key: jax.Array, size: int, length: jnp.ndarray) -> jnp.ndarray:
  """[start, stop) in pixels of a segment of `length` centred uniformly in
  [0, size), clipped to [0, size]."""
  centre = jax.random.uniform(key, (), maxval=size)
  ends = jnp.round(jnp.stack([centre - length / 2, centre + length / 2]))
  return jnp.clip(ends, 0, size).astype(jnp.int32)


def _inside(span: jnp.ndarray, size: int) -> jnp.ndarray:
  """`[..., size]` bools: whether each pixel index lies in [start, stop)
  of each span `[..., 2]`."""
  index = jnp.arange(size)
  return (index >= span[..., :1]) & (index < span[..., 1:])


def cutmix_box(
  key: jax.Array, height: int, width: int, alpha: float
) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """CutMix's box as a mask `[height, width]` (True: pasted), and lam, the
  share of the image outside it, i.e. 1 - its area after clipping."""
  k_lam, k_row, k_col = jax.random.split(key, 3)
  side = jnp.sqrt(1 - jax.random.beta(k_lam, alpha, alpha))
  rows = _span(k_row, height, height * side)
  cols = _span(k_col, width, width * side)
  mask = _inside(rows, height)[:, None] & _inside(cols, width)[None, :]
  area = (rows[1] - rows[0]) * (cols[1] - cols[0])
  return mask, 1 - area / (height * width)


def cutmix(
  key: jax.Array, images: jnp.ndarray, targets: jnp.ndarray, alpha: float
) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """CutMix: the same box of each image's neighbour pasted into it, and
  the targets blended by the area pasted (`cutmix_box`)."""
  mask, lam = cutmix_box(key, images.shape[1], images.shape[2], alpha)
  pasted = jnp.where(mask[:, :, None], jnp.roll(images, 1, axis=0), images)
  return pasted, blend(targets, lam)


def mix(
  key: jax.Array,
  images: jnp.ndarray,
  targets: jnp.ndarray,
  *,
  mixup_alpha: float = 0.0,
  cutmix_alpha: float = 0.0,
  switch_prob: float = 0.5,
  prob: float = 1.0,
  larger_own: bool = False,
) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """The batch mixed, with probability `prob`, by Mixup (`mixup_alpha` >
  0) or CutMix (`cutmix_alpha` > 0); with both on, by CutMix with
  probability `switch_prob`. Both ops are computed and one is selected,
  so the choice costs no branch under `vmap`."""
  if not (mixup_alpha > 0 or cutmix_alpha > 0):
    raise ValueError('mix() needs mixup_alpha > 0 or cutmix_alpha > 0.')
  k_mix, k_switch, k_mixup, k_cutmix = jax.random.split(key, 4)
  if cutmix_alpha > 0 and mixup_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  choices = []
  if mixup_alpha > 0:
    choices.append(mixup(k_mixup, images, targets, mixup_alpha, larger_own))
  if cutmix_alpha > 0:
    choices.append(cutmix(k_cutmix, images, targets, cutmix_alpha))
  mixed = jax.tree.map(lambda *c: jnp.where(use_cutmix, c[-1], c[0]), *choices)
  apply = jax.random.uniform(k_mix) < prob
  return jax.tree.map(
    lambda m, x: jnp.where(apply, m, x), mixed, (images, targets)
  )


def erase_masks(
  key: jax.Array,
  batch: int,
  height: int,
  width: int,
  prob: float,
  area: Tuple[float, float],
) -> jnp.ndarray:
  """Random erasing's rectangles as masks `[batch, height, width]`.

  Each image draws `ERASE_TRIES` rectangles of area uniform in `area` (a
  share of the image) and aspect ratio log-uniform in `ERASE_ASPECT`,
  sides rounded to pixels, and takes the first that fits the image with
  its rounded area still in `area`, at a uniform position; it is erased
  with probability `prob`, and only if one fits.
  """
  k_apply, k_area, k_aspect, k_top, k_left = jax.random.split(key, 5)
  tries = (batch, ERASE_TRIES)
  pixels = height * width
  target = pixels * jax.random.uniform(
    k_area, tries, minval=area[0], maxval=area[1]
  )
  log_aspect = jax.random.uniform(
    k_aspect,
    tries,
    minval=math.log(ERASE_ASPECT[0]),
    maxval=math.log(ERASE_ASPECT[1]),
  )
  h = jnp.round(jnp.sqrt(target * jnp.exp(log_aspect)))
  w = jnp.round(jnp.sqrt(target * jnp.exp(-log_aspect)))
  fits = (
    (h >= 1)
    & (w >= 1)
    & (h <= height)
    & (w <= width)
    & (h * w >= area[0] * pixels)
    & (h * w <= area[1] * pixels)
  )
  first = jnp.argmax(fits, axis=1)[:, None]
  h = jnp.take_along_axis(h, first, axis=1)
  w = jnp.take_along_axis(w, first, axis=1)
  top = jnp.floor(jax.random.uniform(k_top, (batch, 1)) * (height - h + 1))
  left = jnp.floor(jax.random.uniform(k_left, (batch, 1)) * (width - w + 1))
  rows = _inside(jnp.concatenate([top, top + h], axis=1), height)
  cols = _inside(jnp.concatenate([left, left + w], axis=1), width)
  erase = fits.any(axis=1) & (jax.random.uniform(k_apply, (batch,)) < prob)
  return erase[:, None, None] & rows[:, :, None] & cols[:, None, :]


def random_erase(
  key: jax.Array,
  images: jnp.ndarray,
  prob: float,
  area: Tuple[float, float] = (0.02, 1 / 3),
) -> jnp.ndarray:
  """Random erasing: the rectangles of `erase_masks` filled with standard
  normal noise, drawn per pixel and channel."""
  k_mask, k_noise = jax.random.split(key)
  batch, height, width = images.shape[:3]
  mask = erase_masks(k_mask, batch, height, width, prob, area)
  noise = jax.random.normal(k_noise, images.shape, images.dtype)
  return jnp.where(mask[..., None], noise, images)


def _mixup_alpha(mix_config: ml_collections.ConfigDict) -> float:
  """Mixup's Beta parameter: `mixup_alpha`, else big_vision's `mixup_p`."""
  return mix_config.mixup_alpha or mix_config.mixup_p


def active(config: ml_collections.ConfigDict) -> Tuple[str, ...]:
  """The ops `config` turns on, among 'random_erase', 'mixup', 'cutmix'."""
  mix_config, erase = config.mix, config.random_erase
  on = []
  if erase.prob > 0:
    on.append('random_erase')
  if mix_config.prob > 0:
    if _mixup_alpha(mix_config) > 0:
      on.append('mixup')
    if mix_config.cutmix_alpha > 0:
      on.append('cutmix')
  return tuple(on)


def check_config(config: ml_collections.ConfigDict) -> None:
  """ConfigErrors for the rules across keys of `config.mix` and
  `config.random_erase` (each key's range is in `config_checks.RULES`)."""
  mix_config, erase = config.mix, config.random_erase
  if mix_config.mixup_alpha > 0 and mix_config.mixup_p > 0:
    raise ConfigError(
      f'config.mix.mixup_alpha={mix_config.mixup_alpha} and '
      f'config.mix.mixup_p={mix_config.mixup_p} both set Mixup; use '
      "mixup_alpha (Zhang et al.'s Beta(alpha, alpha)) or mixup_p "
      "(big_vision's, each image keeping the larger share), not both."
    )
  if erase.area_min > erase.area_max:
    raise ConfigError(
      f'config.random_erase.area_min={erase.area_min} is above '
      f'config.random_erase.area_max={erase.area_max}; the erased share '
      'of the image lies between them, e.g. 0.02 and 1/3.'
    )


def from_config(
  config: ml_collections.ConfigDict, num_classes: int
) -> Optional[BatchTransform]:
  """The batch transform of `config.random_erase` and `config.mix` for
  labels of `num_classes` classes, or None when both are off."""
  on = active(config)
  if not on:
    return None
  mix_config, erase = config.mix, config.random_erase
  mix_options = dict(
    mixup_alpha=_mixup_alpha(mix_config) if 'mixup' in on else 0.0,
    cutmix_alpha=mix_config.cutmix_alpha if 'cutmix' in on else 0.0,
    switch_prob=mix_config.switch_prob,
    prob=mix_config.prob,
    larger_own=mix_config.mixup_p > 0,
  )
  area = (erase.area_min, erase.area_max)

  def transform(key, images, labels):
    k_erase, k_mix = jax.random.split(key)
    targets = labels
    if labels.ndim == 1:
      targets = jax.nn.one_hot(labels, num_classes)
    targets = targets.astype(jnp.float32)
    if 'random_erase' in on:
      images = random_erase(k_erase, images, erase.prob, area)
    if 'mixup' in on or 'cutmix' in on:
      images, targets = mix(k_mix, images, targets, **mix_options)
    return images, targets

  return transform
