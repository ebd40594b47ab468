"""A prepared TensorFlow Datasets dataset (`tfds.builder(data.name, data_dir=data.path or None)`).

Never downloads: offline machines hang for minutes on cloud-storage retries, so a dataset that is not
prepared in the data_dir is an error at once, naming the offline options. The only module that
imports TensorFlow, and only inside `load`, so that importing it stays cheap.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from resnet_flax.data import DataError, ImageData

SPLITS = ('train', 'test')


def load(data_config: ml_collections.ConfigDict) -> dict[str, ImageData]:
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core.utils import gcs_utils

  # Never look for metadata on GCS: tfds 4.9.10 defaults to this, older releases tried (and hung offline).
  gcs_utils._is_gcs_disabled = True
  name, data_dir = data_config.name, data_config.path or None
  tried = f'tried tfds.builder({name!r}, data_dir={data_dir!r}), which never downloads'
  try:
    builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DataError(f'tfds has no dataset {name!r} ({tried}): {_offline_options(name)}') from e
  if not builder.is_prepared():
    raise DataError(f'tfds dataset {name!r} is not prepared in {builder.data_dir} ({tried}): {_offline_options(name)}')
  _check_features(builder.info, name)
  class_names = tuple(builder.info.features['label'].names)
  return {split: _read_split(tfds, builder, split, class_names) for split in SPLITS}


def _offline_options(name: str) -> str:
  archive = 'cifar-100-python.tar.gz' if name == 'cifar100' else 'cifar-10-python.tar.gz'
  return (
    'use a prepared tfds data_dir (--config.data.path=<data_dir>), or the official archive '
    f'(--config.data.source=cifar_archive --config.data.path=<{archive}>)'
  )


def _check_features(info: Any, name: str):
  """This source needs 'image' and 'label' features, images of one size, and both splits."""
  missing = [f for f in ('image', 'label') if f not in info.features]
  if missing:
    raise DataError(
      f'tfds dataset {name!r} has no {" or ".join(missing)} feature (it has '
      f'{sorted(info.features)}): use an image-classification dataset'
    )
  if None in info.features['image'].shape:
    raise DataError(
      f'tfds dataset {name!r} has images of varying size {info.features["image"].shape}: '
      'this source needs one size; resize them into an image folder (--config.data.source=folder)'
    )
  missing = [split for split in SPLITS if split not in info.splits]
  if missing:
    raise DataError(
      f'tfds dataset {name!r} has no {" or ".join(missing)} split (it has {sorted(info.splits)}): '
      'use a dataset with train and test splits'
    )


def _read_split(tfds: Any, builder: Any, split: str, class_names: tuple[str, ...]) -> ImageData:
  """The whole split in host memory."""
  arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
  return ImageData(np.asarray(arrays['image'], np.uint8), np.asarray(arrays['label'], np.int32), class_names)
