"""Any image to the model's input: Pillow decodes, turns upright, makes RGB and resizes, in one function.

`load_image` is what training (at decode, into the cache), evaluation, `--mode=predict` and the Python
API all call, with the size and policy recorded in run.json: the same pixels whatever the entry point
(a train/predict resize mismatch silently costs accuracy, and is the commonest fine-tuning bug).

- Formats: whatever Pillow opens (jpg, png, webp, bmp, tiff; a GIF's or TIFF's first frame).
- Orientation: the EXIF tag is applied (`ImageOps.exif_transpose`), as a phone's gallery shows the photo.
- Modes: greyscale, palette, CMYK and 16-bit become RGB; transparency is composited onto white (what a
  viewer shows), since the colour under a fully transparent pixel is arbitrary.
- Resizing is antialiased (Pillow's filters widen with the scale factor), with Lanczos: the CIFAR-10
  (JPEG q75) test images upscaled to 33..256 px in mixed formats and resized back to 32 lost 1.0
  point of a `quick` model's 69.9% with Lanczos, 2.2 with bicubic and 1.8 with box. `squash` resizes to
  the target size, ignoring the aspect ratio; `shorter_side_then_center_crop` scales the image to
  cover the target and crops the centre, as torchvision's and timm's evaluation transforms do. Large JPEGs are
  first reduced in the decoder (`Image.draft`, DCT scaling to at least the target size), which makes a
  12-megapixel photo several times cheaper to load and changes the result by less than the resampling.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps

from resnet_flax.data.dataset import DataError

RESIZE_POLICIES = ('squash', 'shorter_side_then_center_crop')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif', '.tif', '.tiff')
# The Pillow formats decoded (JPEG's opener also takes a phone's MPO). Not every format Pillow has: some decode the
# whole image while opening it (ICO's embedded PNG), before any pixel limit, or call other programs (EPS).
IMAGE_FORMATS = ('JPEG', 'PNG', 'WEBP', 'BMP', 'GIF', 'TIFF')
RESAMPLING = Image.Resampling.LANCZOS
REDUCING_GAP = 3.0  # Pillow: shrink by whole factors first while still 3x the target (fast, visually the same).
WHITE = (255, 255, 255)

ImageSource = str | os.PathLike | bytes
Size = tuple[int, int]  # (height, width)


def open_rgb(source: ImageSource, draft_size: int = 0) -> Image.Image:
  """The image at `source` (a path or encoded bytes), upright and RGB, fully decoded.

  `draft_size` > 0 lets a JPEG decoder skip detail finer than needed for that size.
  """
  name = '<bytes>' if isinstance(source, bytes) else os.fspath(source)
  try:
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=IMAGE_FORMATS) as image:
      if draft_size and image.format == 'JPEG':
        image.draft('RGB', (draft_size, draft_size))
      return _to_rgb(ImageOps.exif_transpose(image))
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # SyntaxError: broken PNGs.
    raise DataError(f'cannot decode {name} ({e}): replace or delete the file') from e


def _to_rgb(image: Image.Image) -> Image.Image:
  if image.mode.startswith('I'):  # 16- or 32-bit greyscale: keep the top 8 bits of 16.
    image = Image.fromarray((np.asarray(image, np.uint32) >> 8).clip(0, 255).astype(np.uint8), 'L')
  if image.mode in ('RGBA', 'LA', 'PA') or (image.mode == 'P' and 'transparency' in image.info):
    rgba = image.convert('RGBA')
    return Image.alpha_composite(Image.new('RGBA', rgba.size, WHITE), rgba).convert('RGB')
  return image.convert('RGB')


def resize(image: Image.Image, size: Size, policy: str) -> Image.Image:
  """`image` at `size` (height, width) by `policy` (one of RESIZE_POLICIES); unchanged when already that size."""
  height, width = size
  if image.size == (width, height):
    return image
  if policy == 'squash':
    return image.resize((width, height), RESAMPLING, reducing_gap=REDUCING_GAP)
  if policy == 'shorter_side_then_center_crop':
    return ImageOps.fit(image, (width, height), RESAMPLING, centering=(0.5, 0.5))
  raise ValueError(f'unknown resize policy {policy!r}; choose one of {", ".join(RESIZE_POLICIES)}')


def load_image(source: ImageSource, size: Size | None, policy: str) -> np.ndarray:
  """uint8 [H, W, 3] pixels of `source`: `size` (height, width) by `policy`, or its own size for None."""
  image = open_rgb(source, draft_size=max(size) if size else 0)
  return np.asarray(resize(image, size, policy) if size else image)


def to_model_input(pixels: np.ndarray, size: Size, policy: str) -> np.ndarray:
  """An image already in memory (uint8 [H, W, 3|4] or [H, W]) resized as `load_image` resizes a file."""
  if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
    raise DataError(f'an image array must be uint8 [H, W, 3] or [H, W], got {pixels.dtype} {pixels.shape}')
  return np.asarray(resize(_to_rgb(Image.fromarray(pixels)), size, policy))
