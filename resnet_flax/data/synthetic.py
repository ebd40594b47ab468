"""A learnable synthetic dataset: each class is a colour of its own plus pixel noise.

Needs no files and no network; used by `configs/smoke.py`, tests and benchmarks.
"""

import ml_collections
import numpy as np

from resnet_flax.data.dataset import ImageData


def _make_split(
  num_images: int, num_classes: int, size: int, rng: np.random.Generator, prototypes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  labels = rng.integers(0, num_classes, num_images).astype(np.int32)
  noise = rng.normal(0.0, 40.0, (num_images, size, size, 3))
  images = np.clip(prototypes[labels] + noise, 0, 255).astype(np.uint8)
  return images, labels


def load(data_config: ml_collections.ConfigDict) -> dict[str, ImageData]:
  size, num_classes = data_config.synthetic_image_size, data_config.synthetic_num_classes
  rng = np.random.default_rng(1234)
  prototypes = rng.uniform(40, 215, (num_classes, 1, 1, 3))  # Survives crops and flips.
  class_names = tuple(f'class_{i}' for i in range(num_classes))
  splits = {}
  for split, n in (('train', data_config.synthetic_train_size), ('test', data_config.synthetic_test_size)):
    images, labels = _make_split(n, num_classes, size, rng, prototypes)
    splits[split] = ImageData(images, labels, class_names)
  return splits
