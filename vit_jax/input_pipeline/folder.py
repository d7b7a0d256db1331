"""A user's own images: `DIR/{train,test}/<class_name>/<image>`.

Labels are the positions of the class names in sorted order (from the train
split's folders). JPEG and PNG files are read whatever their extension case
(`.jpg`, `.jpeg`, `.png`); each file's first bytes are checked when the folder
is listed, so a broken or mislabelled file is reported by path before any
training starts rather than as an anonymous decode error mid-run.
"""

import os
from typing import Dict, List, Sequence, Tuple

import ml_collections
import numpy as np
import tensorflow as tf

from vit_jax.input_pipeline import preprocess
from vit_jax.input_pipeline import sources
from vit_jax.errors import DatasetError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
_SIGNATURES = {b'\xff\xd8\xff': 'JPEG', b'\x89PNG\r\n\x1a\n': 'PNG'}
SPLIT_DIRS = ('train', 'test')


def _check_image_file(path: str) -> None:
  """Raises DatasetError unless `path` can be opened and starts like an image."""
  try:
    with open(path, 'rb') as f:
      head = f.read(8)
  except OSError as e:
    raise DatasetError(f'Cannot read image {path}: {e}.') from e
  if not any(head.startswith(sig) for sig in _SIGNATURES):
    raise DatasetError(
        f'{path} is not a JPEG or PNG image (its first bytes are {head!r}). '
        'Remove it, or convert it to JPEG/PNG.')


def _list_class_dir(class_dir: str) -> List[str]:
  """Sorted image paths in one class directory; an empty class is an error."""
  names = sorted(n for n in os.listdir(class_dir)
                 if n.lower().endswith(IMAGE_EXTENSIONS))
  if not names:
    raise DatasetError(
        f'Class directory {class_dir} holds no {"/".join(IMAGE_EXTENSIONS)} '
        'images. Add images or remove the directory.')
  paths = [os.path.join(class_dir, n) for n in names]
  for path in paths:
    _check_image_file(path)
  return paths


def _class_names(split_dir: str) -> List[str]:
  names = sorted(n for n in os.listdir(split_dir)
                 if os.path.isdir(os.path.join(split_dir, n)))
  if not names:
    raise DatasetError(
        f'{split_dir} has no class sub-directories; expected '
        f'{split_dir}/<class_name>/<image>.')
  return names


def _list_split(root: str, split: str,
                classes: Dict[str, int]) -> Tuple[List[str], List[int]]:
  split_dir = os.path.join(root, split)
  paths, labels = [], []
  for name in _class_names(split_dir):
    if name not in classes:
      raise DatasetError(
          f'Class {name!r} of {split_dir} has no directory in '
          f'{os.path.join(root, SPLIT_DIRS[0])}; both splits need the same '
          f'classes ({sorted(classes)}).')
    class_paths = _list_class_dir(os.path.join(split_dir, name))
    paths += class_paths
    labels += [classes[name]] * len(class_paths)
  return paths, labels


def _decode(path: tf.Tensor) -> tf.Tensor:
  """Any JPEG/PNG (grey, RGB, RGBA) as uint8 [H, W, 3]."""
  image = tf.io.decode_image(tf.io.read_file(path), channels=3,
                             expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def read_images(paths: Sequence[str],
                pp: ml_collections.ConfigDict) -> np.ndarray:
  """Image files (JPEG/PNG, any size), preprocessed for evaluation.

  Each file is checked first, so an unreadable one is named. Returns float32
  `[len(paths), pp.crop, pp.crop, 3]` in [-1, 1], as the model sees
  evaluation images.
  """
  resize = preprocess.eval_fn(pp)
  images = []
  for path in paths:
    _check_image_file(path)
    try:
      image = _decode(tf.constant(path))
    except tf.errors.OpError as e:
      raise DatasetError(f'Cannot decode image {path}: {e.message} The file '
                         'is truncated or corrupt; re-save it.') from e
    images.append(resize({'image': image, 'label': 0})['image'].numpy())
  return np.stack(images)


def load_folder(root: str) -> sources.InMemorySource:
  """Lists and checks `root/{train,test}/<class>/<image>`."""
  missing = [s for s in SPLIT_DIRS if not os.path.isdir(os.path.join(root, s))]
  if missing:
    raise DatasetError(
        f'Image folder {root} lacks {", ".join(missing)} sub-directories; '
        f'expected {root}/{{train,test}}/<class_name>/<image>.')
  names = _class_names(os.path.join(root, SPLIT_DIRS[0]))
  classes = {name: label for label, name in enumerate(names)}
  paths, labels, sizes = [], [], {}
  for split in SPLIT_DIRS:
    split_paths, split_labels = _list_split(root, split, classes)
    paths += split_paths
    labels += split_labels
    sizes[split] = len(split_paths)
  info = sources.DatasetInfo(os.path.basename(os.path.normpath(root)),
                             tuple(names), sizes)
  return sources.InMemorySource(info, np.array(paths), np.array(labels),
                                decode=_decode)
