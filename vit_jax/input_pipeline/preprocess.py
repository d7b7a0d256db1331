"""Image preprocessing, as vit_jax does it for fine-tuning, plus small-image
augmentations.

* Evaluation: resize to `crop` x `crop`.
* Training, `augment='inception_crop'` (vit_jax): a random box covering 5% to
  100% of the image, resized to `crop`.
* Training, `augment='pad_and_crop'` (small images, e.g. digits): resize to
  `crop`, pad `pad` black pixels on every side, take a random `crop` window
  (a random shift of up to `pad` pixels).
* Training, `augment='affine'` (small images, e.g. digits): resize to
  `crop`, then one random affine map about the centre: a rotation of up to
  `rotate` degrees, a zoom by a factor in [1 - `scale`, 1 + `scale`], a
  shear of up to `shear` degrees and a shift of up to `pad` pixels, each
  uniform; pixels from outside the image are black. With `elastic` > 0,
  an elastic distortion follows (Simard et al. 2003, the classic MNIST
  augmentation): every pixel moves by a displacement field of uniform
  noise in [-1, 1], blurred by a Gaussian of `elastic_sigma` pixels and
  scaled by `elastic` (Simard et al.: 34 and 4 at 28x28).
* Training, `augment='none'`: as evaluation.
* `flip`: random horizontal flip after any training augmentation (off for
  digits, where a mirrored 2 is not a 2).
* `randaug=(num_layers, magnitude)`: RandAugment after the crop and flip,
  on the image rounded to uint8 (`randaugment.py`: big_vision's 16 ops
  and magnitude scale); the ops named in `randaug_exclude` are never
  drawn. None: off.

Every image leaves with 3 channels (grey repeated, alpha dropped) and values
in [-1, 1]. Training randomness comes from stateless ops seeded by
(seed, position in the stream), so a run is reproducible for a given seed
however many threads tf.data uses.
"""

import math
import numbers
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import ml_collections
import numpy as np
import tensorflow as tf

from vit_jax.errors import ConfigError
from vit_jax.input_pipeline import randaugment

AUGMENTATIONS = ('inception_crop', 'pad_and_crop', 'affine', 'none')
INCEPTION_AREA_RANGE = (0.05, 1.0)

Example = Dict[str, tf.Tensor]


# What a `config.pp` without these keys gets: vit_jax's preprocessing.
# vit_jax's configs set only `train`, `test` and `crop`, and for an image
# folder only `crop` (its `train/` and `test/` sub-folders are the splits).
PP_DEFAULTS = {
  'train': 'train',
  'test': 'test',
  'augment': 'inception_crop',
  'pad': 0,
  'rotate': 0.0,
  'scale': 0.0,
  'shear': 0.0,
  'elastic': 0.0,
  'elastic_sigma': 4.0,
  'flip': True,
  'randaug': None,
  'randaug_exclude': (),
}


def complete_pp(pp: Optional[Mapping[str, Any]]) -> ml_collections.ConfigDict:
  """A copy of `config.pp` with every key it lacks at `PP_DEFAULTS`; a
  ConfigError if it has no `crop` (the one key without a default)."""
  if pp is None or 'crop' not in pp:
    raise ConfigError(
      'config.pp.crop is not set; give the image side fed to the model, '
      'e.g. --config.pp.crop=224 (or use a dataset preset).'
    )
  return ml_collections.ConfigDict({**PP_DEFAULTS, **dict(pp.items())})


def check_pp(pp: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for preprocessing settings that cannot work."""
  if pp.augment not in AUGMENTATIONS:
    raise ConfigError(
      f'config.pp.augment={pp.augment!r}; choose one of {AUGMENTATIONS}.'
    )
  if pp.crop <= 0 or pp.pad < 0:
    raise ConfigError(
      f'config.pp.crop={pp.crop} must be > 0 and config.pp.pad={pp.pad} >= 0.'
    )
  for key, top in (('rotate', 180), ('scale', 1), ('shear', 90)):
    if pp.augment == 'affine' and not 0 <= pp[key] < top:
      raise ConfigError(
        f'config.pp.{key}={pp[key]} must be in [0, {top}) (augment=affine).'
      )
  if pp.augment == 'affine' and (pp.elastic < 0 or pp.elastic_sigma <= 0):
    raise ConfigError(
      f'config.pp.elastic={pp.elastic} must be >= 0 and '
      f'config.pp.elastic_sigma={pp.elastic_sigma} > 0 (augment=affine).'
    )
  if pp.augment != 'affine' and pp.get('elastic'):
    raise ConfigError(
      f'config.pp.elastic={pp.elastic} distorts only after '
      f"augment='affine', not augment={pp.augment!r}; set "
      "config.pp.augment='affine' or config.pp.elastic=0."
    )
  _check_randaug(pp.get('randaug'), _excluded(pp))


def _excluded(pp: Mapping[str, Any]) -> Tuple[str, ...]:
  """`pp.randaug_exclude` as a tuple of names (one name alone too)."""
  exclude = pp.get('randaug_exclude') or ()
  return (exclude,) if isinstance(exclude, str) else tuple(exclude)


def _check_randaug(randaug: Any, exclude: Tuple[str, ...]) -> None:
  """ConfigErrors unless `randaug` is None or (num_layers, magnitude) in
  range and `exclude` names RandAugment ops, leaving some to draw."""
  unknown = [name for name in exclude if name not in randaugment.OPS]
  if unknown:
    raise ConfigError(
      f'config.pp.randaug_exclude names {unknown}, not RandAugment ops; '
      f'choose among {randaugment.OPS}.'
    )
  if randaug is None:
    return
  top = randaugment.MAX_MAGNITUDE
  if not (
    isinstance(randaug, (tuple, list))
    and len(randaug) == 2
    and _is_int(randaug[0])
    and randaug[0] >= 0
    and _is_number(randaug[1])
    and 0 <= randaug[1] <= top
  ):
    raise ConfigError(
      f'config.pp.randaug={randaug!r} must be None (off) or (num_layers, '
      f'magnitude): an integer >= 0 and a number in [0, {top:g}], e.g. '
      "--config.pp.randaug='(2, 10)'."
    )
  if randaug[0] and not randaugment.kept_ops(exclude):
    raise ConfigError(
      'config.pp.randaug_exclude excludes every RandAugment op; keep some, '
      'or set config.pp.randaug=None.'
    )


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _rgb_float(image: tf.Tensor) -> tf.Tensor:
  """uint8 [H, W, C] with C in {1, 3, 4} → float32 [H, W, 3] in [0, 255]."""
  channels = image.shape[-1]
  if channels == 1:
    image = tf.image.grayscale_to_rgb(image)
  elif channels == 4:
    image = image[..., :3]
  elif channels != 3:
    raise ValueError(f'Images must have 1, 3 or 4 channels, got {channels}.')
  return tf.cast(image, tf.float32)


def _resize(image: tf.Tensor, crop: int) -> tf.Tensor:
  return tf.image.resize(image, [crop, crop])


def _normalize(image: tf.Tensor) -> tf.Tensor:
  return image / 127.5 - 1.0


def _inception_crop(image: tf.Tensor, crop: int, seed: tf.Tensor) -> tf.Tensor:
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
    tf.shape(image),
    bounding_boxes=tf.zeros([1, 0, 4]),
    seed=seed,
    area_range=INCEPTION_AREA_RANGE,
    min_object_covered=0.0,
    use_image_if_no_bounding_boxes=True,
  )
  box = tf.slice(image, begin, size)
  box.set_shape([None, None, 3])
  return _resize(box, crop)


def _pad_and_crop(
  image: tf.Tensor, crop: int, pad: int, seed: tf.Tensor
) -> tf.Tensor:
  image = tf.pad(_resize(image, crop), [[pad, pad], [pad, pad], [0, 0]])
  return tf.image.stateless_random_crop(image, [crop, crop, 3], seed=seed)


def _affine(
  image: tf.Tensor, pp: ml_collections.ConfigDict, seed: tf.Tensor
) -> tf.Tensor:
  """`image` resized to `pp.crop`, then rotated, zoomed, sheared and
  shifted about its centre by random amounts within `pp`'s limits."""
  image = _resize(image, pp.crop)
  uniform = tf.random.stateless_uniform([5], seed, minval=-1.0, maxval=1.0)
  angle = uniform[0] * pp.rotate * math.pi / 180
  zoom = 1.0 + uniform[1] * pp.scale
  shear = tf.tan(uniform[2] * pp.shear * math.pi / 180)
  shift = uniform[3:] * pp.pad
  # The map sends an input pixel p to zoom * rotation @ shearing @ (p - c)
  # + c + shift; the op wants its inverse, from output pixels to input ones.
  cos, sin = tf.cos(angle), tf.sin(angle)
  inverse = (
    tf.stack([[cos - shear * sin, sin + shear * cos], [-sin, cos]]) / zoom
  )
  centre = tf.constant([(pp.crop - 1) / 2] * 2, tf.float32)
  offset = centre - tf.linalg.matvec(inverse, centre + shift)
  transform = tf.concat(
    [inverse[0], offset[:1], inverse[1], offset[1:], tf.zeros([2])], axis=0
  )
  return tf.raw_ops.ImageProjectiveTransformV3(
    images=image[None],
    transforms=transform[None],
    output_shape=[pp.crop, pp.crop],
    fill_value=0.0,
    interpolation='BILINEAR',
    fill_mode='CONSTANT',
  )[0]


def _gaussian_matrix(size: int, sigma: float) -> np.ndarray:
  """The [size, size] matrix that blurs a length-`size` signal by a
  Gaussian of `sigma` samples, taking zeros beyond its ends."""
  offsets = np.arange(size)[:, None] - np.arange(size)[None, :]
  taps = np.exp(-(offsets**2) / (2 * sigma**2))
  radius = np.arange(-size + 1, size)
  return (taps / np.exp(-(radius**2) / (2 * sigma**2)).sum()).astype(np.float32)


def _bilinear(image: tf.Tensor, rows: tf.Tensor, cols: tf.Tensor) -> tf.Tensor:
  """`image` [H, W, C] read at the real positions (`rows`, `cols`), each
  [H, W], interpolated bilinearly; positions outside the image read 0."""
  height, width = image.shape[0], image.shape[1]
  corners_y = (
    tf.floor(rows)[None] + tf.constant([0.0, 0.0, 1.0, 1.0])[:, None, None]
  )
  corners_x = (
    tf.floor(cols)[None] + tf.constant([0.0, 1.0, 0.0, 1.0])[:, None, None]
  )
  weights = (1 - tf.abs(rows[None] - corners_y)) * (
    1 - tf.abs(cols[None] - corners_x)
  )
  inside = (
    (corners_y >= 0)
    & (corners_y <= height - 1)
    & (corners_x >= 0)
    & (corners_x <= width - 1)
  )
  weights *= tf.cast(inside, tf.float32)
  index = tf.cast(
    tf.stack(
      [
        tf.clip_by_value(corners_y, 0, height - 1),
        tf.clip_by_value(corners_x, 0, width - 1),
      ],
      axis=-1,
    ),
    tf.int32,
  )
  return tf.reduce_sum(weights[..., None] * tf.gather_nd(image, index), 0)


def _elastic(
  image: tf.Tensor, alpha: float, sigma: float, seed: tf.Tensor
) -> tf.Tensor:
  """`image` [S, S, C] with each pixel moved by a random smooth field:
  uniform noise in [-1, 1] per pixel and axis, blurred by a Gaussian of
  `sigma` pixels, times `alpha` (Simard et al. 2003)."""
  size = image.shape[0]
  blur = tf.constant(_gaussian_matrix(size, sigma))
  noise = tf.random.stateless_uniform([size, size, 2], seed, -1.0, 1.0)
  field = alpha * tf.einsum('ij,jkc,lk->ilc', blur, noise, blur)
  grid = tf.range(size, dtype=tf.float32)
  rows, cols = tf.meshgrid(grid, grid, indexing='ij')
  return _bilinear(image, rows + field[..., 0], cols + field[..., 1])


def _randaug(
  image: tf.Tensor, pp: ml_collections.ConfigDict, seed: tf.Tensor
) -> tf.Tensor:
  """`image` (float, [0, 255]) rounded to uint8, where RandAugment's ops
  are defined (posterize keeps bits, equalize counts levels), through
  `pp.randaug`, and back to float."""
  num_layers, magnitude = pp.randaug
  pixels = tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)
  pixels = randaugment.randaug(
    pixels, num_layers, magnitude, seed, _excluded(pp)
  )
  return tf.cast(pixels, tf.float32)


def eval_fn(crop: int) -> Callable[[Example], Example]:
  """The evaluation preprocessing of one example: resized to `crop`."""

  def preprocess(example: Example) -> Example:
    image = _normalize(_resize(_rgb_float(example['image']), crop))
    return {'image': image, 'label': example['label']}

  return preprocess


def train_fn(
  pp: ml_collections.ConfigDict, seed: int
) -> Callable[[tf.Tensor, Example], Example]:
  """The training preprocessing of the `index`-th example of the stream."""
  check_pp(pp)

  def preprocess(index: tf.Tensor, example: Example) -> Example:
    crop_seed, flip_seed = tf.unstack(
      tf.random.experimental.stateless_split(
        tf.stack([tf.constant(seed, tf.int64), index]), num=2
      )
    )
    image = _rgb_float(example['image'])
    if pp.augment == 'inception_crop':
      image = _inception_crop(image, pp.crop, crop_seed)
    elif pp.augment == 'pad_and_crop':
      image = _pad_and_crop(image, pp.crop, pp.pad, crop_seed)
    elif pp.augment == 'affine':
      image = _affine(image, pp, crop_seed)
      if pp.elastic:
        elastic_seed = tf.random.experimental.stateless_fold_in(crop_seed, 1)
        image = _elastic(image, pp.elastic, pp.elastic_sigma, elastic_seed)
    else:
      image = _resize(image, pp.crop)
    if pp.flip:
      image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    if pp.randaug and pp.randaug[0]:
      randaug_seed = tf.random.experimental.stateless_fold_in(crop_seed, 2)
      image = _randaug(image, pp, randaug_seed)
    return {'image': _normalize(image), 'label': example['label']}

  return preprocess
