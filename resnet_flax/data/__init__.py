"""Data sources: each returns uint8 NHWC images, int32 labels and class names per split.

`load_splits(config.data)` is the one entry point the trainer uses. Sources never import
TensorFlow except `tfds`, so training runs where TensorFlow is absent.
"""

from __future__ import annotations

import importlib

import ml_collections
import numpy as np

from resnet_flax.data.dataset import DataError, ImageData
from resnet_flax.data.dataset import class_index as class_index  # Re-exported: data.class_index.
from resnet_flax.data.dataset import class_indices as class_indices  # Re-exported: data.class_indices.

SOURCES = {
  'synthetic': 'resnet_flax.data.synthetic',
  'folder': 'resnet_flax.data.folder',
  'cifar_archive': 'resnet_flax.data.cifar_archive',
  'tfds': 'resnet_flax.data.tfds_source',
}


def load_splits(data_config: ml_collections.ConfigDict) -> dict[str, ImageData]:
  """Returns {'train', 'test'} and, when the data has one, 'validation' for `data_config.source`.

  A source gives 'validation' when the dataset has its own (a `val/` folder, tfds's validation split);
  `data_config.validation_size` > 0 instead holds out that many training images (a fixed choice), after
  `data_config.train_examples` > 0 kept that many of them (a class-stratified fixed choice: short sweeps).
  Whatever chooses (the best checkpoint, early stopping, sweeps) uses 'validation'; 'test' is only
  reported.
  """
  splits = _source(data_config).load(data_config)
  if data_config.validation_size > 0 and 'validation' in splits:
    raise DataError(
      f'data.validation_size={data_config.validation_size} but the {data_config.source} data has its own '
      'validation split: set --config.data.validation_size=0 to use it'
    )
  train = splits['train']
  splits = {**splits, 'train': subset(train, stratified_subset(train.labels, data_config.train_examples, seed=0))}
  return hold_out_validation(splits, data_config.validation_size, seed=0)


def load_test_split(data_config: ml_collections.ConfigDict) -> ImageData:
  """The test split alone: a source that can read it alone (an image folder) decodes nothing else."""
  source = _source(data_config)
  return source.load_test(data_config) if hasattr(source, 'load_test') else source.load(data_config)['test']


def _source(data_config: ml_collections.ConfigDict):
  if data_config.source not in SOURCES:
    raise DataError(f'unknown data.source {data_config.source!r}; choose one of {sorted(SOURCES)}')
  return importlib.import_module(SOURCES[data_config.source])


def hold_out_validation(splits: dict[str, ImageData], size: int, seed: int) -> dict[str, ImageData]:
  """Moves `size` training images (a fixed choice for a given seed) into a 'validation' split."""
  if size <= 0:
    return splits
  train = splits['train']
  if size >= len(train):
    raise DataError(f'data.validation_size={size} must be smaller than the {len(train)} training images')
  order = np.random.default_rng(seed).permutation(len(train))
  keep, held = np.sort(order[:-size]), np.sort(order[-size:])
  return {**splits, 'train': subset(train, keep), 'validation': subset(train, held)}


def subset(split: ImageData, indices: np.ndarray) -> ImageData:
  return (
    split if len(indices) == len(split) else ImageData(split.images[indices], split.labels[indices], split.class_names)
  )


def stratified_subset(labels: np.ndarray, num_examples: int, seed: int) -> np.ndarray:
  """Sorted indices of `num_examples` examples (all for 0 or more than there are): a shuffle by
  `seed`, then the classes in turn, so every class has its share; a smaller number takes a subset."""
  if not num_examples or num_examples >= len(labels):
    return np.arange(len(labels))
  shuffled = np.random.default_rng(seed).permutation(len(labels))
  shuffled_labels = labels[shuffled]
  rank_in_class = np.zeros(len(labels), np.int64)
  for label in np.unique(shuffled_labels):
    members = shuffled_labels == label
    rank_in_class[members] = np.arange(members.sum())
  return np.sort(shuffled[np.lexsort((shuffled_labels, rank_in_class))[:num_examples]])
