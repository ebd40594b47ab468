"""What every data source returns: splits held in host memory (`ImageData`), and the error a user's data gets.

Apart from the package's `__init__` (which picks a source by name), so the sources can import these
without importing the registry that imports them.
"""

from __future__ import annotations

import dataclasses

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
