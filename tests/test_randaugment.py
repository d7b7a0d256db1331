"""RandAugment (`vit_jax.input_pipeline.randaugment`): each op computes
what PIL's op of its name computes (or, for the geometric ops and those PIL
lacks, a NumPy rendering of the definition), arguments follow big_vision's
magnitude scale, and the policy is seeded, uniform over the kept ops and
wired into the training pipeline and the config."""

import chex
import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageOps
import pytest
import tensorflow as tf

from tests import test_features
from tests.test_configs import REPO
from tests.test_configs import parse
from tests.test_input_pipeline import Hosts
from tests.test_input_pipeline import first_batches
from tests.test_input_pipeline import make_config
from tests.test_input_pipeline import train_of
from vit_jax import config_checks
from vit_jax import features
from vit_jax import finetune
from vit_jax import results
from vit_jax import train
from vit_jax.errors import ConfigError
from vit_jax.input_pipeline import embedded
from vit_jax.input_pipeline import preprocess
from vit_jax.input_pipeline import randaugment

SIDE = 16


def _image() -> np.ndarray:
  """A 16x16 RGB image with channels of different, skewed histograms that
  reach neither 0 nor 255 (so AutoContrast and Equalize have work), and a
  few saturated pixels (so thresholds and clipping are crossed)."""
  rng = np.random.default_rng(0)
  image = rng.beta([2, 3, 5], [5, 3, 2], [SIDE, SIDE, 3]) * 180 + 30
  image = image.astype(np.uint8)
  image[0, :3] = [[255, 250, 0], [3, 255, 240], [128, 127, 129]]
  return image


IMAGE = _image()
SEED = tf.constant([3, 4], tf.int64)


def apply(name: str, magnitude: float, seed: tf.Tensor = SEED) -> np.ndarray:
  return randaugment.apply_op(tf.constant(IMAGE), name, magnitude, seed).numpy()


def pil(function, *args) -> np.ndarray:
  return np.asarray(function(Image.fromarray(IMAGE), *args))


def enhancer(kind):
  return lambda image, factor: kind(image).enhance(factor)


# ---------------------------------------------------------------- scale


def test_arguments_follow_big_visions_level_scale():
  """At 224 pixels the arguments are big_vision's (`level_to_arg`, level
  10 the largest of AutoAugment's search); translations and Cutout scale
  with the side."""
  at = {}
  for name in randaugment.OPS:
    value = randaugment.argument(name, 10, 224)
    at[name] = value if value is None else round(value, 9)
  assert at == {
    'AutoContrast': None,
    'Equalize': None,
    'Invert': None,
    'Rotate': 30.0,
    'Posterize': 4,
    'Solarize': 256,
    'Color': 1.9,
    'Contrast': 1.9,
    'Brightness': 1.9,
    'Sharpness': 1.9,
    'ShearX': 0.3,
    'ShearY': 0.3,
    'TranslateX': 100.0,
    'TranslateY': 100.0,
    'Cutout': 40,
    'SolarizeAdd': 110,
  }
  assert randaugment.argument('TranslateX', 10, 112) == 50.0
  assert randaugment.argument('Cutout', 15, 112) == 30
  assert randaugment.argument('Rotate', 15, 224) == 45.0
  assert randaugment.argument('Solarize', 5, 224) == 128
  assert randaugment.argument('SolarizeAdd', 5, 224) == 55
  assert randaugment.argument('Color', 5, 224) == 1.0
  # Posterize: int(0.4 m) bits, at least 1 (TensorFlow clamps the shift
  # of big_vision's op to 7 bits), at most 8.
  assert [
    randaugment.argument('Posterize', m, 224) for m in (0, 5, 15, 25)
  ] == [
    1,
    2,
    6,
    8,
  ]


# ----------------------------------------------------------- colour ops


@pytest.mark.parametrize(
  'name, magnitude, reference, tolerance',
  [
    ('Invert', 10, ImageOps.invert, 0),
    ('Equalize', 10, ImageOps.equalize, 0),
    # PIL stretches with a double-precision scale and offset, then
    # truncates: where the exact value is whole it may land just below it
    # (one level low at about 0.5% of pixels of random images); this op
    # truncates the exact integer quotient.
    ('AutoContrast', 10, ImageOps.autocontrast, 1),
    ('Posterize', 5, ImageOps.posterize, 0),  # 2 bits.
    ('Posterize', 7.5, ImageOps.posterize, 0),  # 3 bits.
    ('Solarize', 5, ImageOps.solarize, 0),  # Threshold 128.
    ('Solarize', 3, ImageOps.solarize, 0),  # Threshold 76.
    ('Color', 3, enhancer(ImageEnhance.Color), 0),  # Factor 0.64.
    ('Color', 8, enhancer(ImageEnhance.Color), 0),  # 1.54, extrapolates.
    ('Contrast', 3, enhancer(ImageEnhance.Contrast), 0),
    ('Contrast', 8, enhancer(ImageEnhance.Contrast), 0),
    ('Brightness', 3, enhancer(ImageEnhance.Brightness), 0),
    ('Brightness', 8, enhancer(ImageEnhance.Brightness), 0),
    ('Sharpness', 3, enhancer(ImageEnhance.Sharpness), 0),
    ('Sharpness', 8, enhancer(ImageEnhance.Sharpness), 0),
  ],
)
def test_colour_op_equals_pil(name, magnitude, reference, tolerance):
  argument = randaugment.argument(name, magnitude, SIDE)
  expected = pil(reference) if argument is None else pil(reference, argument)
  got = apply(name, magnitude)
  difference = np.abs(got.astype(int) - expected)
  assert difference.max() <= tolerance
  assert (difference > 0).mean() < 0.05  # Off by one only at a few pixels.
  assert not np.array_equal(got, IMAGE)  # The op did something.


def test_solarize_add_adds_to_dark_pixels_only():
  values = IMAGE.astype(int)
  expected = np.where(values < 128, np.minimum(values + 55, 255), values)
  np.testing.assert_array_equal(apply('SolarizeAdd', 5), expected)


def test_contrast_blends_towards_the_rounded_mean_grey():
  """Factor 0 leaves PIL's mean luma everywhere (not big_vision's pixel
  count / 256)."""
  grey = np.asarray(Image.fromarray(IMAGE).convert('L'), np.float64)
  got = randaugment.contrast(tf.constant(IMAGE), 0.0).numpy()
  np.testing.assert_array_equal(got, int(grey.mean() + 0.5))


# -------------------------------------------------------- geometric ops


def nearest_reference(image: np.ndarray, source):
  """`image` resampled as output pixel (x, y) <- input pixel nearest to
  `source(x, y)`, grey outside; and where the source lies within 1e-3 of a
  tie between two pixels, which float32 may round either way."""
  height, width = image.shape[:2]
  y, x = np.mgrid[0:height, 0:width].astype(np.float64)
  sx, sy = source(x, y)
  tie = (np.abs(sx % 1 - 0.5) < 1e-3) | (np.abs(sy % 1 - 0.5) < 1e-3)
  ix, iy = np.floor(sx + 0.5).astype(int), np.floor(sy + 0.5).astype(int)
  inside = (ix >= 0) & (ix < width) & (iy >= 0) & (iy < height)
  out = np.full_like(image, randaugment.FILL)
  out[inside] = image[iy[inside], ix[inside]]
  return out, tie


def rotation_source(degrees: float):
  """Where output pixel (x, y) reads from, rotating about the centre."""
  angle = np.radians(degrees)
  centre = (SIDE - 1) / 2

  def source(x, y):
    dx, dy = x - centre, y - centre
    return (
      centre + np.cos(angle) * dx - np.sin(angle) * dy,
      centre + np.sin(angle) * dx + np.cos(angle) * dy,
    )

  return source


GEOMETRIC = {
  'Rotate': (randaugment.rotate, rotation_source),
  'ShearX': (randaugment.shear_x, lambda s: lambda x, y: (x + s * y, y)),
  'ShearY': (randaugment.shear_y, lambda s: lambda x, y: (x, y + s * x)),
  'TranslateX': (randaugment.translate_x, lambda p: lambda x, y: (x + p, y)),
  'TranslateY': (randaugment.translate_y, lambda p: lambda x, y: (x, y + p)),
}


@pytest.mark.parametrize('name', sorted(GEOMETRIC))
@pytest.mark.parametrize('sign', [1, -1])
def test_geometric_op_equals_nearest_pixel_resampling(name, sign):
  """Magnitude 7: rotations of 21 degrees, shears of 0.21, shifts of 5 px
  at 16 px."""
  op, source = GEOMETRIC[name]
  argument = sign * randaugment.argument(name, 7, SIDE)
  expected, tie = nearest_reference(IMAGE, source(argument))
  got = op(tf.constant(IMAGE), argument).numpy()
  assert tie.mean() < 0.05
  np.testing.assert_array_equal(got[~tie], expected[~tie])
  assert (got == randaugment.FILL).all(-1).any()  # Uncovered pixels grey.


@pytest.mark.parametrize(
  'name, matrix',
  [('TranslateX', (1, 0, 5, 0, 1, 0)), ('TranslateY', (1, 0, 0, 0, 1, -5))],
)
def test_translation_equals_pils_affine(name, matrix):
  """PIL samples at pixel centres too; for whole-pixel shifts the two
  agree exactly (for shears PIL's centres sit half a pixel off)."""
  shift = matrix[2] + matrix[5]
  op = GEOMETRIC[name][0]
  expected = Image.fromarray(IMAGE).transform(
    (SIDE, SIDE), Image.AFFINE, matrix, Image.NEAREST, fillcolor=(128,) * 3
  )
  got = op(tf.constant(IMAGE), float(shift)).numpy()
  np.testing.assert_array_equal(got, np.asarray(expected))


def test_signed_ops_take_either_sign_by_seed():
  outcomes = set()
  for seed in range(16):
    got = apply('ShearX', 7, tf.constant([seed, 0], tf.int64))
    signs = [
      s
      for s in (1, -1)
      if np.array_equal(
        got, randaugment.shear_x(tf.constant(IMAGE), s * 0.21).numpy()
      )
    ]
    assert len(signs) == 1
    outcomes.add(signs[0])
  assert outcomes == {1, -1}


def test_cutout_greys_a_square_cut_at_the_edges():
  got = randaugment.cutout(tf.constant(IMAGE), 3, tf.constant([1, 14]))
  inside = np.zeros([SIDE, SIDE], bool)
  inside[0:4, 11:16] = True  # Rows [-2, 4), columns [11, 17), cut.
  np.testing.assert_array_equal(got.numpy()[inside], randaugment.FILL)
  np.testing.assert_array_equal(got.numpy()[~inside], IMAGE[~inside])


def test_cutout_by_magnitude_is_a_grey_square_of_twice_the_half_side():
  """At magnitude 30 on 32 px: half-side int(3 * 40 * 32 / 224) = 17, so
  the square is 34 px, cut by the image's edges."""
  image = np.zeros([32, 32, 3], np.uint8)
  for seed in range(4):
    got = randaugment.apply_op(
      tf.constant(image), 'Cutout', 30, tf.constant([seed, 1], tf.int64)
    ).numpy()
    rows, cols = np.nonzero((got == randaugment.FILL).all(-1))
    assert 17 <= np.ptp(rows) + 1 <= 32 and 17 <= np.ptp(cols) + 1 <= 32
    assert len(rows) == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)


# ------------------------------------------------------------ magnitude


@pytest.mark.parametrize(
  'name, magnitude',
  [
    ('Rotate', 0),
    ('ShearX', 0),
    ('ShearY', 0),
    ('TranslateX', 0),
    ('TranslateY', 0),
    ('Cutout', 0),
    ('SolarizeAdd', 0),
    # big_vision's scale weakens these as the magnitude grows.
    ('Solarize', 10),
    ('Posterize', 20),
    # Factor 0.1 + 0.18 * 5 = 1: the image itself.
    ('Color', 5),
    ('Contrast', 5),
    ('Brightness', 5),
    ('Sharpness', 5),
  ],
)
def test_op_is_the_identity_where_its_argument_is_neutral(name, magnitude):
  np.testing.assert_array_equal(apply(name, magnitude), IMAGE)


# --------------------------------------------------------------- policy


def test_randaug_is_deterministic_per_seed():
  image = tf.constant(IMAGE)

  def run(seed):
    return randaugment.randaug(
      image, 2, 10, tf.constant([seed, 7], tf.int64)
    ).numpy()

  np.testing.assert_array_equal(run(1), run(1))
  outputs = [run(seed) for seed in range(8)]
  assert len({o.tobytes() for o in outputs}) >= 6


def test_ops_are_drawn_uniformly_and_excluded_ones_never():
  exclude = ('Invert', 'Solarize', 'Color')
  kept = randaugment.kept_ops(exclude)
  assert len(kept) == 13 and not set(kept) & set(exclude)
  counts = np.zeros(len(kept), int)
  for seed in range(400):
    drawn = randaugment.ops_drawn(2, tf.constant([seed, 0], tf.int64), exclude)
    np.add.at(counts, drawn.numpy(), 1)
  expected = 800 / 13  # About 61.5; a binomial standard deviation of 7.6.
  assert counts.min() > expected - 25 and counts.max() < expected + 25


def test_only_kept_ops_are_applied():
  """With every op but Invert excluded, one layer inverts and two restore."""
  exclude = tuple(n for n in randaugment.OPS if n != 'Invert')
  image = tf.constant(IMAGE)
  for num_layers, expected in ((1, 255 - IMAGE), (2, IMAGE), (0, IMAGE)):
    got = randaugment.randaug(image, num_layers, 10, SEED, exclude)
    np.testing.assert_array_equal(got.numpy(), expected)


# ------------------------------------------------------- pipeline, config


@pytest.fixture(scope='module')
def digits():
  return embedded.load_digits()


def test_pipeline_with_randaug_yields_augmented_batches(digits):
  """`pp.randaug=(2, 10)` on the digits: batches of the usual shape and
  dtype, pixels on the uint8 grid RandAugment works on, reproducible, and
  different from the stream without it (same crops, same seed)."""
  hosts = Hosts(0, 1, 2)

  def batch(**pp):
    config = make_config('digits', crop=16, batch=16, pad=2, flip=False, **pp)
    return first_batches(train_of(digits, config, hosts), 1)[0]

  plain = batch()
  augmented = batch(randaug=(2, 10))
  chex.assert_shape(augmented['image'], (2, 8, 16, 16, 3))
  chex.assert_type(
    [augmented['image'], augmented['label']], [np.float32, np.int32]
  )
  assert -1.0 <= augmented['image'].min() <= augmented['image'].max() <= 1.0
  levels = (augmented['image'] + 1) * 127.5
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
  chex.assert_trees_all_equal(augmented, batch(randaug=(2, 10)))
  np.testing.assert_array_equal(augmented['label'], plain['label'])
  assert not np.allclose(augmented['image'], plain['image'])
  # No layers: the stream without RandAugment, not even rounded.
  chex.assert_trees_all_equal(batch(randaug=(0, 10)), plain)


def test_randaug_is_set_from_the_command_line():
  config = parse(
    f'--config={REPO}/configs/vit.py:ti16,digits',
    '--config.pp.randaug=(2, 15)',
    "--config.pp.randaug_exclude=('Invert', 'Solarize', 'Color')",
  )
  assert config.pp.randaug == (2, 15)
  assert config.pp.randaug_exclude == ('Invert', 'Solarize', 'Color')
  config_checks.check(train.with_complete_pp(config))
  default = parse(f'--config={REPO}/configs/vit.py:ti16,digits').pp
  assert default.randaug is None and default.randaug_exclude == ()


def test_runs_recorded_before_randaug_resume():
  """A record without the keys counts as RandAugment off (ADDED_KEYS)."""
  config = train.with_complete_pp(
    parse(f'--config={REPO}/configs/vit.py:ti16,digits')
  )
  record = results.config_record(config)
  del record['pp.randaug'], record['pp.randaug_exclude']
  assert results.config_changes(record, config) == []


@pytest.mark.parametrize(
  'randaug, exclude, message',
  [
    ((2, 31), (), r'config\.pp\.randaug=\(2, 31\) must be None \(off\)'),
    ((-1, 10), (), r'config\.pp\.randaug=\(-1, 10\) must be'),
    ((2.0, 10), (), r'config\.pp\.randaug=\(2\.0, 10\) must be'),
    ((2,), (), r'config\.pp\.randaug=\(2,\) must be'),
    (None, ('Invrt',), r"randaug_exclude names \['Invrt'\], not RandAug"),
    ((1, 5), randaugment.OPS, r'randaug_exclude excludes every RandAug'),
  ],
)
def test_bad_randaug_settings_are_config_errors(randaug, exclude, message):
  pp = make_config(randaug=randaug, randaug_exclude=exclude).pp
  with pytest.raises(ConfigError, match=message):
    preprocess.check_pp(pp)


def test_cached_features_refuse_randaug():
  config = test_features.head_config()
  model, params = test_features.micro_model_and_params(config)
  fine = finetune.from_config(config.finetune)
  config.pp.randaug = (2, 10)
  with pytest.raises(
    ConfigError, match=r'config\.pp\.randaug=\(2, 10\); leave'
  ):
    features.check_cacheable(config, model, params, fine.is_trainable)


def test_config_checks_rule_names_the_pair():
  rule = config_checks.RULES['pp.randaug']
  assert rule.accepts(None) and rule.accepts((2, 10)) and rule.accepts([1, 0.5])
  with pytest.raises(
    ConfigError,
    match=r'config\.pp\.randaug=\(2, 40\) must be \(an integer >= 0, a '
    r'number in \[0, 30\]\) or None',
  ):
    config_checks.check_rule('pp.randaug', rule, (2, 40))
