"""What every data source returns: splits held in host memory (`ImageData`), and the error a user's data gets;
how a class is found among a model's classes: by name (`class_indices`).

Apart from the package's `__init__` (which picks a source by name), so the sources can import these
without importing the registry that imports them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

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


def class_index(name: str, model_class_names: Sequence[str]) -> int | None:
  """The index of class `name` in `model_class_names` (a model's output index); None where it is not there."""
  names = list(model_class_names)
  return names.index(name) if name in names else None


def class_indices(names: Sequence[str], model_class_names: Sequence[str]) -> np.ndarray:
  """int64 model output index of each of the data's classes `names`, matched by name; one a model lacks is a
  DataError."""
  unknown = [name for name in names if class_index(name, model_class_names) is None]
  if unknown:
    raise DataError(
      f'the model does not know the classes {unknown} of the evaluated data; it knows '
      f'{list(model_class_names)}: rename or remove those class folders'
    )
  return np.array([class_index(name, model_class_names) for name in names], np.int64)
