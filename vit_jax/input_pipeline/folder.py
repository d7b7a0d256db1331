"""A user's own images: `DIR/{train,test}/<class_name>/<image>`.

Labels are the positions of the class names in sorted order (from the train
split's folders). JPEG and PNG files are read whatever their extension case
(`.jpg`, `.jpeg`, `.png`). Listing the folder decodes every image once, in
parallel, and reports every problem at once (unreadable, not JPEG/PNG,
truncated or corrupt files, empty class directories, test classes without a
train directory) in one `DatasetError` naming each path, so a broken file
stops the run before training rather than as an anonymous decode error
mid-run.
"""

import concurrent.futures
import os
import re
from typing import List, Optional, Sequence

import numpy as np
import tensorflow as tf

from vit_jax.errors import DatasetError
from vit_jax.input_pipeline import preprocess
from vit_jax.input_pipeline import sources

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
_SIGNATURES = (b'\xff\xd8\xff', b'\x89PNG\r\n\x1a\n')  # JPEG, PNG.
SPLIT_DIRS = ('train', 'test')
MAX_LISTED = 20  # Problems named in one error; the rest are counted.


def _decode_bytes(data: tf.Tensor) -> tf.Tensor:
  """Any JPEG/PNG (grey, RGB, RGBA) as uint8 [H, W, 3]."""
  image = tf.io.decode_image(data, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def _decode_path(path: tf.Tensor) -> tf.Tensor:
  """The pipeline's decoder: reads and decodes one listed (checked) file."""
  return _decode_bytes(tf.io.read_file(path))


def _op_message(error: tf.errors.OpError) -> str:
  """TensorFlow's message without its '{{function_node ...}}' and op name."""
  message = re.sub(r'\{\{[^}]*\}\}|\[Op:.*', '', error.message)
  return message.strip().rstrip('.')


def decode_file(path: str) -> tf.Tensor:
  """The image in file `path` as uint8 [H, W, 3].

  Raises DatasetError naming `path` when it cannot be read, is not a JPEG
  or PNG, or does not decode (truncated or corrupt).
  """
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise DatasetError(f'Cannot read image {path}: {e}.') from e
  if not data.startswith(_SIGNATURES):
    raise DatasetError(
      f'{path} is not a JPEG or PNG image (its first bytes are '
      f'{data[:8]!r}). Remove it, or convert it to JPEG/PNG.'
    )
  try:
    return _decode_bytes(tf.constant(data))
  except tf.errors.OpError as e:
    raise DatasetError(
      f'Cannot decode image {path}: {_op_message(e)}. The '
      'file is truncated or corrupt; re-save it.'
    ) from e


def _file_problem(path: str) -> Optional[str]:
  """What is wrong with image file `path`, or None if it decodes."""
  try:
    decode_file(path)
  except DatasetError as e:
    return str(e)
  return None


def _file_problems(paths: Sequence[str]) -> List[str]:
  """The problems of all `paths`, in their order; decoded in parallel (the
  decoding runs in TensorFlow's kernels, outside Python's lock)."""
  with concurrent.futures.ThreadPoolExecutor() as pool:
    return [p for p in pool.map(_file_problem, paths) if p]


def _class_dirs(split_dir: str) -> List[str]:
  return sorted(
    n
    for n in os.listdir(split_dir)
    if os.path.isdir(os.path.join(split_dir, n))
  )


def _no_classes(split_dir: str) -> str:
  return (
    f'{split_dir} has no class sub-directories; expected '
    f'{split_dir}/<class_name>/<image>.'
  )


def _image_names(class_dir: str) -> List[str]:
  return sorted(
    n for n in os.listdir(class_dir) if n.lower().endswith(IMAGE_EXTENSIONS)
  )


def _report(root: str, problems: Sequence[str]) -> DatasetError:
  """One error listing up to MAX_LISTED problems, one per line."""
  listed = [f'  {p}' for p in problems[:MAX_LISTED]]
  if len(problems) > MAX_LISTED:
    listed.append(f'  ... and {len(problems) - MAX_LISTED} more.')
  return DatasetError(
    f'Image folder {root} has {len(problems)} problem(s); fix them all '
    'before training:\n' + '\n'.join(listed)
  )


def class_names(root: str) -> List[str]:
  """The sorted class directories of `root/train`, the dataset's labels."""
  missing = [s for s in SPLIT_DIRS if not os.path.isdir(os.path.join(root, s))]
  if missing:
    raise DatasetError(
      f'Image folder {root} lacks {", ".join(missing)} sub-directories; '
      f'expected {root}/{{train,test}}/<class_name>/<image>.'
    )
  train_dir = os.path.join(root, SPLIT_DIRS[0])
  names = _class_dirs(train_dir)
  if not names:
    raise DatasetError(_no_classes(train_dir))
  return names


def read_images(paths: Sequence[str], crop: int) -> np.ndarray:
  """Image files (JPEG/PNG, any size), preprocessed for evaluation.

  A file that cannot be read or decoded raises DatasetError naming it.
  Returns float32 `[len(paths), crop, crop, 3]` in [-1, 1], as the model
  sees evaluation images.
  """
  resize = preprocess.eval_fn(crop)
  return np.stack(
    [
      resize({'image': decode_file(path), 'label': 0})['image'].numpy()
      for path in paths
    ]
  )


def load_folder(root: str) -> sources.InMemorySource:
  """Lists `root/{train,test}/<class>/<image>`, checking every file."""
  names = class_names(root)
  classes = {name: label for label, name in enumerate(names)}
  problems, paths, labels, sizes = [], [], [], {}
  for split in SPLIT_DIRS:
    split_dir = os.path.join(root, split)
    split_classes = _class_dirs(split_dir)
    if not split_classes:
      problems.append(_no_classes(split_dir))
    sizes[split] = 0
    for name in split_classes:
      class_dir = os.path.join(split_dir, name)
      if name not in classes:
        problems.append(
          f'Class {name!r} of {split_dir} has no directory in '
          f'{os.path.join(root, SPLIT_DIRS[0])}; both splits need the same '
          f'classes ({names}).'
        )
        continue
      images = _image_names(class_dir)
      if not images:
        problems.append(
          f'Class directory {class_dir} holds no '
          f'{"/".join(IMAGE_EXTENSIONS)} images. Add images or remove the '
          'directory.'
        )
      paths += [os.path.join(class_dir, image) for image in images]
      labels += [classes[name]] * len(images)
      sizes[split] += len(images)
  problems += _file_problems(paths)
  if problems:
    raise _report(root, problems)
  info = sources.DatasetInfo(
    os.path.basename(os.path.normpath(root)), tuple(names), sizes
  )
  return sources.InMemorySource(
    info, np.array(paths), np.array(labels), decode=_decode_path
  )
