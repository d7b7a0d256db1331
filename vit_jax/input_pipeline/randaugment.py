"""RandAugment (Cubuk et al., 2020) on uint8 images, with big_vision's ops
and magnitude scale.

`randaug(image, num_layers, magnitude, seed)` runs `num_layers` steps; each
draws one op uniformly from `OPS` (less any excluded) and always applies it,
at the one `magnitude` that every step shares. So does big_vision's
`randaug(2, 15)` (its `pp/autoaugment.py`, forked from tensorflow/tpu's
`autoaugment.py`): the per-op probability it draws is never used.

The magnitude m is on AutoAugment's level scale, where 10 is the largest
level of its search space (big_vision's recipes also use 15 and 20; up to
`MAX_MAGNITUDE` is accepted). Each op's argument is big_vision's function
of m / 10 (`argument`); ± marks a random sign, half the time negative:

  op                      argument at magnitude m          identity at
  AutoContrast, Equalize, Invert   none                    -
  Rotate                  ± 3m degrees about the centre    m = 0
  ShearX, ShearY          ± 0.03m (x += s y, or y += s x)  m = 0
  TranslateX, TranslateY  ± 10m px at 224 (10m / 224 of the side)  m = 0
  Cutout                  grey square, half-side int(4m) px at 224
                          (m / 56 of the side), random centre   m < 0.25
  Posterize               keep int(0.4m) bits, 1 to 8      m >= 20
  Solarize                invert pixels >= int(25.6m)      m >= 10
  SolarizeAdd             add int(11m) to pixels < 128     m = 0
  Color, Contrast, Brightness, Sharpness   factor 0.1 + 0.18m   m = 5

Solarize and Posterize weaken as m grows: tensorflow/tpu's scale, kept by
big_vision. big_vision translates by 10m and cuts out 8m-pixel squares
whatever the image size; here both scale with the side and equal its values
at 224 pixels. Uncovered pixels are grey (128) and geometric ops take the
nearest pixel, as there.

Each op computes what PIL's op of the same name does (`ImageOps`,
`ImageEnhance`; tests/test_randaugment.py compares them). One departure
from big_vision: its Contrast blends towards the pixel count / 256 (a slip
in tensorflow/tpu's code) where PIL, and this one, use the mean grey level.
"""

import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import tensorflow as tf

OPS = (
  'AutoContrast',
  'Equalize',
  'Invert',
  'Rotate',
  'Posterize',
  'Solarize',
  'Color',
  'Contrast',
  'Brightness',
  'Sharpness',
  'ShearX',
  'ShearY',
  'TranslateX',
  'TranslateY',
  'Cutout',
  'SolarizeAdd',
)
# The ops whose argument is negated half the time.
SIGNED = ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY')
# AutoAugment's largest level: magnitude 10 gives each op its "full" range.
MAX_LEVEL = 10.0
# The largest magnitude accepted: Rotate 90 degrees, ShearX/Y 0.9.
MAX_MAGNITUDE = 30.0
# What uncovered pixels get (tensorflow/tpu's grey).
FILL = 128
# big_vision's TranslateX/Y shift and Cutout half-side at magnitude 10, in
# pixels; here fractions of a 224-pixel side.
TRANSLATE_AT_224 = 100
CUTOUT_AT_224 = 40


def _enhance_factor(level: float, side: int) -> float:
  """The factor of PIL's enhancers: 0.1 to 1.9 over levels 0 to 1."""
  del side
  return level * 1.8 + 0.1


# Each op's argument at level = magnitude / 10 on a `side`-pixel image,
# before any sign (big_vision's `level_to_arg`).
_ARGUMENTS: Dict[str, Callable[[float, int], Optional[float]]] = {
  'AutoContrast': lambda level, side: None,
  'Equalize': lambda level, side: None,
  'Invert': lambda level, side: None,
  'Rotate': lambda level, side: level * 30.0,  # Degrees.
  # Bits kept; big_vision's 0 bits keep 1, as TensorFlow clamps its shift.
  'Posterize': lambda level, side: min(max(int(level * 4), 1), 8),
  'Solarize': lambda level, side: int(level * 256),  # Threshold.
  'SolarizeAdd': lambda level, side: int(level * 110),  # Added.
  'Color': _enhance_factor,
  'Contrast': _enhance_factor,
  'Brightness': _enhance_factor,
  'Sharpness': _enhance_factor,
  'ShearX': lambda level, side: level * 0.3,
  'ShearY': lambda level, side: level * 0.3,
  'TranslateX': lambda level, side: level * TRANSLATE_AT_224 * side / 224,
  'TranslateY': lambda level, side: level * TRANSLATE_AT_224 * side / 224,
  'Cutout': lambda level, side: int(level * CUTOUT_AT_224 * side / 224),
}


def argument(name: str, magnitude: float, side: int) -> Optional[float]:
  """The argument of op `name` at `magnitude` on `side`-pixel images, before
  its random sign (None for the ops without one)."""
  return _ARGUMENTS[name](magnitude / MAX_LEVEL, side)


# ------------------------------------------------------------ colour ops


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor) -> tf.Tensor:
  """PIL's `Image.blend(degenerate, image, factor)`: degenerate + factor *
  (image - degenerate) in float32, clipped to [0, 255] and truncated;
  factor 1 is `image`, factors above 1 extrapolate away from `degenerate`."""
  low = tf.cast(degenerate, tf.float32)
  mixed = low + tf.cast(factor, tf.float32) * (tf.cast(image, tf.float32) - low)
  return tf.cast(tf.clip_by_value(mixed, 0.0, 255.0), tf.uint8)


def _grey(image: tf.Tensor) -> tf.Tensor:
  """[H, W, 1] int32 luma as PIL's `convert('L')` rounds it: ITU-R 601-2
  weights in 16-bit fixed point."""
  rgb = tf.cast(image, tf.int32)
  luma = rgb[..., :1] * 19595 + rgb[..., 1:2] * 38470 + rgb[..., 2:] * 7471
  return tf.bitwise.right_shift(luma + 32768, 16)


def auto_contrast(image: tf.Tensor) -> tf.Tensor:
  """Each channel stretched linearly so that its darkest pixel becomes 0
  and its brightest 255, rounded down (PIL's `ImageOps.autocontrast`); a
  flat channel is kept."""
  values = tf.cast(image, tf.int32)
  low = tf.reduce_min(values, axis=(0, 1))
  high = tf.reduce_max(values, axis=(0, 1))
  # Integer arithmetic: exactly the truncated quotient PIL computes in
  # floating point.
  stretched = (values - low) * 255 // tf.maximum(high - low, 1)
  return tf.cast(tf.where(high > low, stretched, values), tf.uint8)


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
  """One [H, W] int32 channel through PIL's equalisation table."""
  histogram = tf.math.bincount(channel, minlength=256, maxlength=256)
  # PIL leaves out the count of the brightest value present.
  brightest = histogram[tf.reduce_max(channel)]
  step = (tf.size(channel) - brightest) // 255
  below = tf.math.cumsum(histogram, exclusive=True)
  table = tf.minimum((step // 2 + below) // tf.maximum(step, 1), 255)
  return tf.where(step > 0, tf.gather(table, channel), channel)


def equalize(image: tf.Tensor) -> tf.Tensor:
  """Each channel's histogram flattened (PIL's `ImageOps.equalize`)."""
  values = tf.cast(image, tf.int32)
  channels = [_equalize_channel(values[..., c]) for c in range(3)]
  return tf.cast(tf.stack(channels, axis=-1), tf.uint8)


def invert(image: tf.Tensor) -> tf.Tensor:
  """255 - each pixel."""
  return 255 - image


def posterize(image: tf.Tensor, bits: int) -> tf.Tensor:
  """Each value with all but its `bits` highest bits cleared."""
  mask = (0xFF << (8 - bits)) & 0xFF
  return tf.bitwise.bitwise_and(image, tf.constant(mask, tf.uint8))


def solarize(image: tf.Tensor, threshold: int) -> tf.Tensor:
  """The pixels >= `threshold` inverted (none for 256 and above)."""
  return tf.where(tf.cast(image, tf.int32) < threshold, image, 255 - image)


def solarize_add(image: tf.Tensor, addition: int) -> tf.Tensor:
  """`addition` added to the pixels below 128, clipped at 255."""
  values = tf.cast(image, tf.int32)
  added = tf.cast(tf.minimum(values + addition, 255), tf.uint8)
  return tf.where(values < 128, added, image)


def color(image: tf.Tensor, factor) -> tf.Tensor:
  """Saturation scaled by `factor`: 0 grey, 1 the image (PIL's
  `ImageEnhance.Color`)."""
  grey = tf.cast(tf.tile(_grey(image), [1, 1, 3]), tf.uint8)
  return _blend(grey, image, factor)


def contrast(image: tf.Tensor, factor) -> tf.Tensor:
  """Contrast scaled by `factor` about the mean grey level, rounded (PIL's
  `ImageEnhance.Contrast`)."""
  mean = tf.reduce_mean(tf.cast(_grey(image), tf.float64))
  level = tf.cast(tf.floor(mean + 0.5), tf.uint8)
  return _blend(tf.fill(tf.shape(image), level), image, factor)


def brightness(image: tf.Tensor, factor) -> tf.Tensor:
  """Every pixel times `factor` (PIL's `ImageEnhance.Brightness`)."""
  return _blend(tf.zeros_like(image), image, factor)


def _smooth(image: tf.Tensor) -> tf.Tensor:
  """PIL's `ImageFilter.SMOOTH`: each inner pixel the 3x3 mean weighting
  the centre 5 and its neighbours 1, rounded; the border pixels kept."""
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  inner = tf.nn.depthwise_conv2d(
    tf.cast(image, tf.float32)[None], kernel, [1, 1, 1, 1], 'VALID'
  )[0]
  inner = tf.cast(tf.clip_by_value(tf.round(inner), 0.0, 255.0), tf.uint8)
  border = tf.pad(
    tf.zeros_like(inner, tf.bool),
    [[1, 1], [1, 1], [0, 0]],
    constant_values=True,
  )
  return tf.where(border, image, tf.pad(inner, [[1, 1], [1, 1], [0, 0]]))


def sharpness(image: tf.Tensor, factor) -> tf.Tensor:
  """Sharpness scaled by `factor`: 0 smoothed, 1 the image, 2 sharpened
  (PIL's `ImageEnhance.Sharpness`)."""
  return _blend(_smooth(image), image, factor)


# --------------------------------------------------------- geometric ops


def _resample(image: tf.Tensor, rows: Sequence) -> tf.Tensor:
  """`image` where output pixel (x, y) reads the input pixel nearest to
  (a x + b y + c, d x + e y + f), `rows` = ((a, b, c), (d, e, f)) with
  pixel centres at integer coordinates; grey outside the image."""
  transform = tf.stack([tf.cast(v, tf.float32) for row in rows for v in row])
  height, width = image.shape[0], image.shape[1]
  return tf.raw_ops.ImageProjectiveTransformV3(
    images=image[None],
    transforms=tf.concat([transform, tf.zeros([2])], 0)[None],
    output_shape=tf.constant([height, width], tf.int32),
    fill_value=float(FILL),
    interpolation='NEAREST',
    fill_mode='CONSTANT',
  )[0]


def rotate(image: tf.Tensor, degrees) -> tf.Tensor:
  """`image` turned by `degrees` about its centre (counter-clockwise as
  displayed)."""
  angle = tf.cast(degrees, tf.float32) * (math.pi / 180)
  cos, sin = tf.cos(angle), tf.sin(angle)
  cx, cy = (image.shape[1] - 1) / 2, (image.shape[0] - 1) / 2
  return _resample(
    image,
    (
      (cos, -sin, cx - cos * cx + sin * cy),
      (sin, cos, cy - sin * cx - cos * cy),
    ),
  )


def shear_x(image: tf.Tensor, level) -> tf.Tensor:
  """Row y shifted left by `level` * y pixels (PIL's affine (1, level, 0,
  0, 1, 0), about the top-left corner)."""
  return _resample(image, ((1.0, level, 0.0), (0.0, 1.0, 0.0)))


def shear_y(image: tf.Tensor, level) -> tf.Tensor:
  """Column x shifted up by `level` * x pixels."""
  return _resample(image, ((1.0, 0.0, 0.0), (level, 1.0, 0.0)))


def translate_x(image: tf.Tensor, pixels) -> tf.Tensor:
  """The content moved left by `pixels`."""
  return _resample(image, ((1.0, 0.0, pixels), (0.0, 1.0, 0.0)))


def translate_y(image: tf.Tensor, pixels) -> tf.Tensor:
  """The content moved up by `pixels`."""
  return _resample(image, ((1.0, 0.0, 0.0), (0.0, 1.0, pixels)))


def cutout(image: tf.Tensor, half: int, centre: tf.Tensor) -> tf.Tensor:
  """Grey over the rows and columns within [-`half`, `half`) of `centre`
  (row, column), cut at the image's edges (DeVries & Taylor, 2017)."""
  rows = tf.range(image.shape[0])[:, None] - centre[0]
  cols = tf.range(image.shape[1])[None, :] - centre[1]
  inside = (rows >= -half) & (rows < half) & (cols >= -half) & (cols < half)
  return tf.where(inside[..., None], tf.constant(FILL, tf.uint8), image)


# ------------------------------------------------------------- the policy

_APPLY: Dict[str, Callable[[tf.Tensor, object], tf.Tensor]] = {
  'AutoContrast': lambda image, arg: auto_contrast(image),
  'Equalize': lambda image, arg: equalize(image),
  'Invert': lambda image, arg: invert(image),
  'Rotate': rotate,
  'Posterize': posterize,
  'Solarize': solarize,
  'Color': color,
  'Contrast': contrast,
  'Brightness': brightness,
  'Sharpness': sharpness,
  'ShearX': shear_x,
  'ShearY': shear_y,
  'TranslateX': translate_x,
  'TranslateY': translate_y,
  'SolarizeAdd': solarize_add,
}


def kept_ops(exclude: Sequence[str] = ()) -> Tuple[str, ...]:
  """`OPS` without `exclude`, in order."""
  return tuple(name for name in OPS if name not in exclude)


def apply_op(
  image: tf.Tensor, name: str, magnitude: float, seed: tf.Tensor
) -> tf.Tensor:
  """`image` [S, S, 3] uint8 after op `name` at `magnitude`; `seed` draws
  the sign of the signed ops (each half the time) and where Cutout cuts."""
  value = argument(name, magnitude, image.shape[0])
  if name == 'Cutout':
    centre = tf.random.stateless_uniform([2], seed, 0, image.shape[0], tf.int32)
    return cutout(image, value, centre)
  if name in SIGNED:
    negative = tf.random.stateless_uniform([], seed) < 0.5
    value = tf.where(negative, -value, value)
  return _APPLY[name](image, value)


def _keys(seed: tf.Tensor, num_layers: int) -> tf.Tensor:
  """[num_layers + 1, 2] seeds: of the draw of ops, then of each step."""
  return tf.random.experimental.stateless_split(seed, num_layers + 1)


def ops_drawn(
  num_layers: int, seed: tf.Tensor, exclude: Sequence[str] = ()
) -> tf.Tensor:
  """[num_layers] int32: which op of `kept_ops(exclude)` each step of
  `randaug(..., num_layers, ..., seed, exclude)` applies."""
  return tf.random.stateless_uniform(
    [num_layers],
    _keys(seed, num_layers)[0],
    0,
    len(kept_ops(exclude)),
    tf.int32,
  )


def randaug(
  image: tf.Tensor,
  num_layers: int,
  magnitude: float,
  seed: tf.Tensor,
  exclude: Sequence[str] = (),
) -> tf.Tensor:
  """`image` [S, S, 3] uint8 after `num_layers` ops, each drawn uniformly
  from `kept_ops(exclude)` and applied at `magnitude`. `seed` ([2]
  integers) draws everything through stateless ops: the same seed, the
  same result."""
  ops = kept_ops(exclude)
  if num_layers <= 0 or not ops:
    return image
  choices = ops_drawn(num_layers, seed, exclude)
  keys = _keys(seed, num_layers)
  shape = image.shape
  for layer in range(num_layers):
    branches = [
      lambda name=name, image=image, key=keys[layer + 1]: apply_op(
        image, name, magnitude, key
      )
      for name in ops
    ]
    image = tf.ensure_shape(tf.switch_case(choices[layer], branches), shape)
  return image
