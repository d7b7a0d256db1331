"""tfds image-classification datasets, prepared on disk by tfds.

As vit_jax does, a dataset that is not prepared yet is downloaded and
prepared on first use (unless `download=False`). tfds retries each URL for
minutes, so its download hosts are first probed with one short connection:
on a machine without network it fails in seconds. Where preparing fails, the
error names the dataset, the directory that was searched and the `tfds
build` command that prepares it elsewhere.
"""

import socket
from typing import List, Optional, Sequence, Tuple
import urllib.parse
import urllib.request

import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax.errors import DatasetError
from vit_jax.input_pipeline import sources


def _not_prepared(
  builder: tfds.core.DatasetBuilder, manual_dir: Optional[str], reason: str
) -> DatasetError:
  """The error for a dataset that is not on disk, with how to prepare it."""
  name = builder.name
  command = f'tfds build {name} --data_dir={builder.data_dir_root}'
  manual = ''
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    command += f' --manual_dir={manual_dir or "MANUAL_DIR"}'
    manual = (
      f' {name} needs archives downloaded by hand into the manual '
      f'directory (looked in {manual_dir or "none set"}; set '
      '--config.tfds_manual_dir).'
    )
  return DatasetError(
    f'tfds dataset {name!r} is not prepared in {builder.data_dir} and '
    f'{reason}.{manual} Prepare it with `{command}` (on a machine with '
    'network access, then copy the directory here) and pass '
    '--config.tfds_data_dir=DIR.'
  )


# Seconds a download host has to accept a connection.
CONNECT_TIMEOUT_S = 5.0
_DEFAULT_PORTS = {'http': 80, 'https': 443, 'ftp': 21}


def _download_urls(builder: tfds.core.DatasetBuilder) -> List[str]:
  """The URLs tfds downloads `builder`'s data from (its registered
  checksums); none for a dataset whose archives are downloaded by hand."""
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    return []
  return sorted(builder.url_infos or {})


def _endpoint(url: str) -> Optional[Tuple[str, int]]:
  """The (host, port) a download of `url` connects to: the proxy's where
  the environment sets one for it; None for an unknown scheme."""
  parts = urllib.parse.urlsplit(url)
  proxy = urllib.request.getproxies().get(parts.scheme)
  if proxy and not urllib.request.proxy_bypass(parts.hostname or ''):
    parts = urllib.parse.urlsplit(proxy)
  port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
  return (parts.hostname, port) if parts.hostname and port else None


def _unreachable(urls: Sequence[str]) -> Optional[str]:
  """Why a download of `urls` cannot start: the first of their hosts that
  does not accept a TCP connection within `CONNECT_TIMEOUT_S`, and the
  error; None when every host accepts one."""
  for host, port in sorted({e for e in map(_endpoint, urls) if e}):
    try:
      socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
      return f'{host}:{port} cannot be reached ({e})'
  return None


def _prepare(
  builder: tfds.core.DatasetBuilder, manual_dir: Optional[str], download: bool
) -> None:
  """Downloads and prepares `builder`, explaining how to do it by hand."""
  if not download:
    raise _not_prepared(builder, manual_dir, 'config.tfds_download is False')
  reason = _unreachable(_download_urls(builder))
  if reason:
    raise _not_prepared(
      builder, manual_dir, f'its download cannot start: {reason}'
    )
  try:
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )
  except Exception as e:  # pylint: disable=broad-except
    raise _not_prepared(
      builder, manual_dir, f'preparing it failed: {type(e).__name__}: {e}'
    ) from e


def _check_features(builder: tfds.core.DatasetBuilder) -> None:
  features = builder.info.features
  image = features['image'] if 'image' in features else None
  label = features['label'] if 'label' in features else None
  if not (
    isinstance(image, tfds.features.Image)
    and isinstance(label, tfds.features.ClassLabel)
  ):
    raise DatasetError(
      f'tfds dataset {builder.name!r} is not an image-classification '
      f"dataset: it needs an 'image' Image and a 'label' ClassLabel "
      f'feature, it has {dict(features)}.'
    )


def label_names(
  name: str, data_dir: Optional[str] = None
) -> Optional[Tuple[str, ...]]:
  """The names of tfds dataset `name`'s labels, read from its builder's info
  (no data needed); None for an unknown dataset or one without label names."""
  try:
    label = tfds.builder(name, data_dir=data_dir).info.features['label']
  except (tfds.core.registered.DatasetNotFoundError, KeyError):
    return None
  names = getattr(label, 'names', None)
  return tuple(names) if names else None


class TfdsSource(sources.Source):
  """A prepared tfds dataset; each host reads `tfds.even_splits` shards."""

  def __init__(
    self,
    name: str,
    data_dir: Optional[str] = None,
    manual_dir: Optional[str] = None,
    download: bool = True,
  ):
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise DatasetError(
        f'Unknown dataset {name!r}: not an embedded dataset (digits, '
        'mnist5k), not an existing directory of images, and not a tfds '
        'name (see `tfds.list_builders()`).'
      ) from e
    if not builder.is_prepared():
      _prepare(builder, manual_dir, download)
    _check_features(builder)
    self._builder = builder
    self.info = sources.DatasetInfo(
      name,
      tuple(builder.info.features['label'].names),
      {split: info.num_examples for split, info in builder.info.splits.items()},
    )

  def _host_split(self, split: str, process_index: int, process_count: int):
    return tfds.even_splits(split, n=process_count)[process_index]

  def num_examples(self, split, process_index=0, process_count=1):
    host_split = self._host_split(split, process_index, process_count)
    try:
      return self._builder.info.splits[host_split].num_examples
    except (KeyError, ValueError, AssertionError) as e:
      raise DatasetError(
        f'tfds dataset {self.info.name!r} has no split matching {split!r} '
        f'({e}); its splits are {dict(self.info.split_sizes)}.'
      ) from e

  def examples(
    self, split, process_index=0, process_count=1, shuffle_seed=None
  ):
    read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed)
    ds = self._builder.as_dataset(
      split=self._host_split(split, process_index, process_count),
      shuffle_files=shuffle_seed is not None,
      read_config=read_config,
      decoders={'image': tfds.decode.SkipDecoding()},
    )
    return ds.map(
      lambda ex: {
        'image': ex['image'],
        'label': tf.cast(ex['label'], tf.int32),
      },
      num_parallel_calls=tf.data.AUTOTUNE,
    )

  def decode(self, item):
    """Decodes after shuffling, so the shuffle buffer holds encoded bytes."""
    feature = self._builder.info.features['image']
    image = feature.decode_example(item)
    image.set_shape(feature.shape)
    return image
