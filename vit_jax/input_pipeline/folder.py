"""A user's own images: `DIR/{train,test}/<class_name>/<image>`.

Labels are the positions of the class names in sorted order (from the train
split's folders). JPEG and PNG files are read whatever their extension case
(`.jpg`, `.jpeg`, `.png`). Listing the folder decodes every image once, in
parallel, and reports every problem at once (unreadable, not JPEG/PNG,
truncated or corrupt files, empty class directories, test classes without a
train directory, and every entry that would not be read: a file of another
type in a class folder, a folder inside a class folder, a file directly in
`train/` or `test/`) in one `DatasetError` naming each path, so a broken or
misplaced file stops the run before training rather than as an anonymous
decode error mid-run or a silently smaller dataset.

Hidden names (starting with '.', such as macOS's `.DS_Store` and `._*`
files or `.ipynb_checkpoints`) are skipped at every level: they are the
litter of tools, not data. Of `DIR` itself only `train/` and `test/` are
read; a README or licence beside them is left alone.

The folder may be local or in a bucket (`gs://...`). Local images are read
again by path in the input pipeline; a bucket's are kept, encoded, from the
check (one download each), since tf.data would read a `gs://` path with
TensorFlow's own GCS client rather than the project's path layer.
"""

import concurrent.futures
import os
import re
from typing import List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from vit_jax import paths as paths_lib
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


def read_file(path: str) -> bytes:
  """The bytes of image file `path`; a DatasetError naming it if unreadable."""
  try:
    return paths_lib.read_bytes(path)
  except OSError as e:
    raise DatasetError(f'Cannot read image {path}: {e}.') from e


def decode_file(path: str) -> tf.Tensor:
  """The image in file `path` as uint8 [H, W, 3].

  Raises DatasetError naming `path` when it cannot be read, is not a JPEG
  or PNG, or does not decode (truncated or corrupt).
  """
  return decode_checked(path, read_file(path))


def decode_checked(path: str, data: bytes) -> tf.Tensor:
  """`data`, the bytes of file `path`, decoded as in `decode_file`."""
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


def _checked_file(
  path: str, keep: bool
) -> Tuple[Optional[bytes], Optional[str]]:
  """The bytes of image file `path` (if `keep`) and None, or None and what
  is wrong with it."""
  try:
    data = read_file(path)
    decode_checked(path, data)
  except DatasetError as e:
    return None, str(e)
  return (data if keep else None), None


def _check_files(
  paths: Sequence[str], keep: bool
) -> Tuple[List[Optional[bytes]], List[str]]:
  """The bytes of all `paths` (only if `keep`: a local folder's are read
  again by path, so they are not held in memory) and their problems, in
  their order; read and decoded in parallel (decoding runs in TensorFlow's
  kernels, outside Python's lock)."""
  with concurrent.futures.ThreadPoolExecutor() as pool:
    checked = list(pool.map(lambda p: _checked_file(p, keep), paths))
  return [data for data, _ in checked], [p for _, p in checked if p]


def _visible(folder: str) -> List[str]:
  """The sorted names in `folder`, without hidden ones (module doc)."""
  return [n for n in paths_lib.listdir(folder) if not n.startswith('.')]


def _split_entries(split_dir: str) -> Tuple[List[str], List[str]]:
  """The class folders of `split_dir` and a problem for each file in it:
  a file there has no class, so it would not be read."""
  classes, problems = [], []
  for name in _visible(split_dir):
    path = paths_lib.join(split_dir, name)
    if paths_lib.is_dir(path):
      classes.append(name)
    else:
      problems.append(
        f'{path}: a file outside the class folders; images must sit in '
        f'{split_dir}/<class_name>/. Move it into its class folder or '
        'remove it.'
      )
  return classes, problems


def _class_dirs(split_dir: str) -> List[str]:
  return _split_entries(split_dir)[0]


def _no_classes(split_dir: str) -> str:
  return (
    f'{split_dir} has no class sub-directories; expected '
    f'{split_dir}/<class_name>/<image>.'
  )


def _not_read(path: str) -> str:
  """Why `path`, in a class folder without an image extension, is not read.

  Only these entries are asked whether they are folders: asking of every
  image would cost a request per file in a bucket.
  """
  if paths_lib.is_dir(path):
    return (
      f'{path}: a folder inside a class folder; images must sit directly '
      'in the class folder (nested folders are not read). Move its images '
      'up or remove it.'
    )
  extension = os.path.splitext(paths_lib.name(path))[1] or 'no extension'
  return (
    f'{path}: not a JPEG/PNG file ({extension}); convert it to JPEG/PNG '
    f'({"/".join(IMAGE_EXTENSIONS)}) or remove it.'
  )


def _image_names(class_dir: str) -> Tuple[List[str], List[str]]:
  """The image files of `class_dir` (by extension; decoding checks them)
  and a problem for every other visible entry."""
  images, problems = [], []
  for name in _visible(class_dir):
    if name.lower().endswith(IMAGE_EXTENSIONS):
      images.append(name)
    else:
      problems.append(_not_read(paths_lib.join(class_dir, name)))
  return images, problems


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
  missing = [
    s for s in SPLIT_DIRS if not paths_lib.is_dir(paths_lib.join(root, s))
  ]
  if missing:
    raise DatasetError(
      f'Image folder {root} lacks {", ".join(missing)} sub-directories; '
      f'expected {root}/{{train,test}}/<class_name>/<image>.'
    )
  train_dir = paths_lib.join(root, SPLIT_DIRS[0])
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
    split_dir = paths_lib.join(root, split)
    split_classes, stray_files = _split_entries(split_dir)
    problems += stray_files
    if not split_classes:
      problems.append(_no_classes(split_dir))
    sizes[split] = 0
    for name in split_classes:
      class_dir = paths_lib.join(split_dir, name)
      if name not in classes:
        problems.append(
          f'Class {name!r} of {split_dir} has no directory in '
          f'{paths_lib.join(root, SPLIT_DIRS[0])}; both splits need the same '
          f'classes ({names}).'
        )
        continue
      images, not_read = _image_names(class_dir)
      problems += not_read
      if not images:
        problems.append(
          f'Class directory {class_dir} holds no '
          f'{"/".join(IMAGE_EXTENSIONS)} images. Add images or remove the '
          'directory.'
        )
      paths += [paths_lib.join(class_dir, image) for image in images]
      labels += [classes[name]] * len(images)
      sizes[split] += len(images)
  remote = paths_lib.is_remote(root)
  contents, file_problems = _check_files(paths, keep=remote)
  problems += file_problems
  if problems:
    raise _report(root, problems)
  info = sources.DatasetInfo(paths_lib.name(root), tuple(names), sizes)
  if remote:
    return sources.InMemorySource(
      info, np.array(contents, dtype=object), np.array(labels), _decode_bytes
    )
  return sources.InMemorySource(
    info, np.array(paths), np.array(labels), decode=_decode_path
  )
