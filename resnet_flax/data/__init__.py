"""Data sources: each returns uint8 NHWC images, int32 labels and class names per split.

`load_splits(config.data)` is the one entry point the trainer uses. Sources never import
TensorFlow except `tfds`, so training runs where TensorFlow is absent.
"""

from __future__ import annotations

import dataclasses
import importlib

import ml_collections
import numpy as np

from resnet_flax.errors import UserError


class DataError(UserError, ValueError):
  """A problem with the user's data or data config, told in one line with its fix."""


@dataclasses.dataclass(frozen=True)
class ImageData:
  """One split held in host memory."""

  images: np.ndarray  # uint8 [N, H, W, C]
  labels: np.ndarray  # int32 [N]
  class_names: tuple[str, ...]

  def __post_init__(self):
    if self.images.dtype != np.uint8 or self.images.ndim != 4:
      raise DataError(f'images must be uint8 [N, H, W, C], got {self.images.dtype} {self.images.shape}')
    if self.labels.shape != (len(self.images),):
      raise DataError(f'{len(self.labels)} labels for {len(self.images)} images')

  def __len__(self) -> int:
    return len(self.images)


SOURCES = {
  'synthetic': 'resnet_flax.data.synthetic',
  'folder': 'resnet_flax.data.folder',
  'cifar_archive': 'resnet_flax.data.cifar_archive',
  'tfds': 'resnet_flax.data.tfds_source',
}


def load_splits(data_config: ml_collections.ConfigDict) -> dict[str, ImageData]:
  """Returns {'train': ..., 'test': ...} for `data_config.source`.

  With `data_config.validation_size` > 0, the last `validation_size` images of a fixed
  permutation of the training split become the 'test' split (the evaluation split), and the
  true test split is kept as 'heldout_test'.
  """
  if data_config.source not in SOURCES:
    raise DataError(f'unknown data.source {data_config.source!r}; choose one of {sorted(SOURCES)}')
  source = importlib.import_module(SOURCES[data_config.source])
  splits = source.load(data_config)
  return hold_out_validation(splits, data_config.validation_size, seed=0)


def hold_out_validation(splits: dict[str, ImageData], size: int, seed: int) -> dict[str, ImageData]:
  """Moves `size` training images (a fixed choice for a given seed) into the 'test' split."""
  if size <= 0:
    return splits
  train = splits['train']
  if size >= len(train):
    raise DataError(f'data.validation_size={size} must be smaller than the {len(train)} training images')
  order = np.random.default_rng(seed).permutation(len(train))
  keep, held = np.sort(order[:-size]), np.sort(order[-size:])
  subset = lambda idx: ImageData(train.images[idx], train.labels[idx], train.class_names)
  return {'train': subset(keep), 'test': subset(held), 'heldout_test': splits['test']}
