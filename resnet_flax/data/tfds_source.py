"""A TensorFlow Datasets dataset, downloaded and prepared by tfds itself when it is missing.

`tfds.builder(data.name, data_dir=data.path or None)`: '' is tfds's default data_dir (~/tensorflow_datasets,
or $TFDS_DATA_DIR). A dataset not prepared there is downloaded and prepared by `builder.download_and_prepare`
(tfds's download manager: its progress bars, checksums and retries) when `data.download` is True; with False
the network is never touched and a missing dataset is an error at once. GCS is never used (`try_gcs=False`,
GCS disabled): offline, its metadata lookups hung for minutes in older tfds releases.

Failing fast offline. tfds's downloader retries each URL ten times with exponential backoff (urllib3
`Retry(total=10, backoff_factor=0.2)`: still retrying after 90 s when measured offline) and passes no timeout,
so a network that drops packets hangs for as long as the OS allows. Bounding that would mean patching tfds
internals (`downloader.MAX_RETRIES`, and a timeout its `session.get` never receives) and would take the
retries away from a real, flaky download too. So this module asks first: one HTTP HEAD per host of the
dataset's registered URLs (`builder.url_infos`: the URLs tfds checks the checksums of, e.g.
www.cs.toronto.edu for cifar10), through `requests` as tfds's downloader does, so proxies (HTTPS_PROXY,
NO_PROXY) and certificates count the same way. Any HTTP answer, whatever its status, means online. When no
host answers within PROBE_TIMEOUT_S the load stops with one line naming the offline options; one host
answering is enough, since registered URLs may belong to configs not being prepared. A dataset with no
registered URLs is downloaded without the check.

Images: a dataset of one size is decoded by tfds. A dataset of varying sizes, or `data.image_size` other than
the dataset's own size, is read as encoded bytes and decoded and resized by `images.load_image`, the function
the folder source, evaluation and prediction use. Each split is written chunk by chunk into one preallocated
uint8 array, never held twice.

The only module that imports TensorFlow, and only inside `load`, so that importing it stays cheap.
"""

from __future__ import annotations

import queue
import re
import threading
import time
import urllib.parse
from collections.abc import Iterable
from typing import Any

import ml_collections
import numpy as np

from resnet_flax.data.dataset import DataError, ImageData
from resnet_flax.data.images import Size, load_image

REQUIRED_SPLITS = ('train', 'test')
OPTIONAL_SPLITS = ('validation',)
PROBE_TIMEOUT_S = 10.0  # For all hosts together; each HEAD gets half of it to connect and half to answer.
CHUNK = 1024  # Examples per tf.data batch while reading a split: little memory, few Python steps.
CIFAR_ARCHIVES = {'cifar10': 'cifar-10-python.tar.gz', 'cifar100': 'cifar-100-python.tar.gz'}


def load(data_config: ml_collections.ConfigDict) -> dict[str, ImageData]:
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core.utils import gcs_utils

  # Never look for metadata on GCS: tfds 4.9.10 defaults to this, older releases tried (and hung offline).
  gcs_utils._is_gcs_disabled = True
  name, data_dir = data_config.name, data_config.path or None
  try:
    builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DataError(
      f'tfds has no dataset {name!r} (tried tfds.builder({name!r}, data_dir={data_dir!r})): {_offline_options(name)}'
    ) from e
  _check_features(builder.info, name)
  size = _resize_to(builder.info.features['image'].shape, data_config.image_size, name)
  if not builder.is_prepared():
    _download_and_prepare(tfds, builder, name, data_config.download)
  _check_splits(builder.info, name)
  class_names = tuple(builder.info.features['label'].names)
  splits = [split for split in (*REQUIRED_SPLITS, *OPTIONAL_SPLITS) if split in builder.info.splits]
  return {split: _read_split(tfds, builder, split, class_names, size, data_config.resize) for split in splits}


def _offline_options(name: str) -> str:
  archive = CIFAR_ARCHIVES.get(name)
  other = (
    f'the official archive (--config.data.source=cifar_archive --config.data.path=<{archive}>)'
    if archive
    else 'an image folder (--config.data.source=folder --config.data.path=<root>)'
  )
  return f'use a prepared tfds data_dir (--config.data.path=<data_dir>), or {other}'


def _download_and_prepare(tfds: Any, builder: Any, name: str, download: bool) -> None:
  """Prepares the dataset into `builder.data_dir` with tfds's download manager, once its hosts answer."""
  from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError

  missing = f'tfds dataset {name!r} is not prepared in {builder.data_dir}'
  if not download:
    raise DataError(
      f'{missing} and data.download=False: {_offline_options(name)}, or set --config.data.download=True online'
    )
  failure = unreachable(builder.url_infos or {})
  if failure:
    raise DataError(f'{missing} and cannot be downloaded ({failure}): offline, {_offline_options(name)}')
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  except (tfds.download.DownloadError, NonMatchingChecksumError, OSError) as e:
    reason = ' '.join(f'{type(e).__name__}: {e}'.split())
    raise DataError(f'{missing} and downloading it failed ({reason}): {_offline_options(name)}') from e


def unreachable(urls: Iterable[str]) -> str | None:
  """None when a host of `urls` answers an HTTP HEAD within PROBE_TIMEOUT_S; else why none did.

  Only http(s) URLs are asked (tfds copies others, e.g. gs://, with other tools); none of them: None.
  """
  import requests

  hosts = {}  # scheme://host[:port] -> one of its URLs.
  for url in urls:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme in ('http', 'https'):
      hosts.setdefault(f'{parts.scheme}://{parts.netloc}', url)
  if not hosts:
    return None
  answers = queue.Queue()

  def ask(host: str, url: str):
    try:
      requests.head(url, timeout=PROBE_TIMEOUT_S / 2, allow_redirects=False)
      answers.put((host, None))
    except requests.RequestException as e:
      answers.put((host, _reason(e)))

  # Daemon threads, not an executor: a name lookup has no timeout, and must not hold up the exit.
  for host, url in hosts.items():
    threading.Thread(target=ask, args=(host, url), daemon=True).start()
  failures, deadline = {}, time.monotonic() + PROBE_TIMEOUT_S
  while len(failures) < len(hosts):
    try:
      host, reason = answers.get(timeout=max(deadline - time.monotonic(), 0))
    except queue.Empty:
      break
    if reason is None:
      return None
    failures[host] = reason
  silent = [f'{host}: no answer within {PROBE_TIMEOUT_S:g} s' for host in hosts if host not in failures]
  return '; '.join([f'{host}: {reason}' for host, reason in failures.items()] + silent)


def _reason(error: Exception) -> str:
  """urllib3's reason under a requests error, without the connection's repr: 'Failed to resolve ...'."""
  cause = getattr(error.args[0], 'reason', None) if error.args else None
  return re.sub(r'^\w+\(host=[^)]*\): ', '', ' '.join(str(cause or error).split()))


def _check_features(info: Any, name: str) -> None:
  """This source needs 'image' and 'label' features: told before any download."""
  missing = [f for f in ('image', 'label') if f not in info.features]
  if missing:
    raise DataError(
      f'tfds dataset {name!r} has no {" or ".join(missing)} feature (it has '
      f'{sorted(info.features)}): use an image-classification dataset'
    )


def _resize_to(shape: tuple[int | None, ...], image_size: int, name: str) -> Size | None:
  """The size `load_image` resizes to: for varying sizes, or data.image_size other than their one size.

  None: tfds decodes the images at their own size.
  """
  if None in shape[:2]:
    if not image_size:
      raise DataError(
        f'tfds dataset {name!r} has images of varying size {shape}: set --config.data.image_size=N '
        '(e.g. 64) to resize them all to N x N (policy: data.resize)'
      )
  elif not image_size or tuple(shape[:2]) == (image_size, image_size):
    return None
  return (image_size, image_size)


def _check_splits(info: Any, name: str) -> None:
  missing = [split for split in REQUIRED_SPLITS if split not in info.splits]
  if missing:
    raise DataError(
      f'tfds dataset {name!r} has no {" or ".join(missing)} split (it has {sorted(info.splits)}): '
      'use a dataset with train and test splits'
    )


def _read_split(
  tfds: Any, builder: Any, split: str, class_names: tuple[str, ...], size: Size | None, policy: str
) -> ImageData:
  """The whole split in host memory; with a `size`, each image decoded and resized by `load_image`."""
  count = builder.info.splits[split].num_examples
  shape = (*size, 3) if size else builder.info.features['image'].shape
  images, labels = np.empty((count, *shape), np.uint8), np.empty(count, np.int32)
  decoders = {'image': tfds.decode.SkipDecoding()} if size else None
  dataset = builder.as_dataset(split=split, batch_size=CHUNK, shuffle_files=False, decoders=decoders)
  start = 0
  for chunk in tfds.as_numpy(dataset):
    stop = start + len(chunk['label'])
    if size:
      for i, encoded in enumerate(chunk['image'], start):
        images[i] = load_image(encoded, size, policy)
    else:
      images[start:stop] = chunk['image']
    labels[start:stop] = chunk['label']
    start = stop
  return ImageData(images, labels, class_names)
