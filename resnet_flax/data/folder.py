"""Image folders: `<root>/{train,test}/<class>/*.{jpg,jpeg,png}`, the tfds.ImageFolder layout.

Class names are the sorted subdirectories of `<root>/train` and label i is `class_names[i]`. The
test split uses the same list: a test class that train lacks is an error, a train class that test
lacks is fine. Extensions match in any case; other files, and names starting with '.' (macOS `._x.jpg`
companions, `.ipynb_checkpoints`), are skipped.

Images are decoded with Pillow and converted to RGB (an alpha channel is dropped). Every image must
have the size of the first training image: another size is an error naming the file and both sizes,
never a silent resize (resizing would change what the model is trained on behind the user's back),
and an undecodable file is an error naming it.

Decoding runs on one core: a thread pool was slower (the per-file work is Python, under the GIL)
and a 2-process pool no faster while using more CPU (workers must be spawned, since forking once
JAX has started threads may deadlock, and the arrays come back pickled). Caching pays:

The decoded split is cached as an uncompressed .npz (images, labels, class_names) in
`data.cache_dir`, or by default in `<root>/.resnet_flax_cache/`, falling back to
`~/.cache/resnet_flax/` when the root is read-only; with no writable place the folder is decoded
every time (a warning says so). The cache key hashes a format version, the class list and every
file's relative path, size and mtime_ns (no file is read), so an added, removed or changed file
makes a new key and the stale cache is simply not used (it is not deleted). Caches are written to
a temporary file and renamed, so a killed run never leaves a broken one; an unreadable cache is
ignored with a warning and rebuilt. A cache hit memory-maps the images (copy-on-write) instead of
copying them: the second load of CIFAR-10 takes a fraction of a second, mostly listing the files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import struct
import tempfile
import time
import zipfile
from pathlib import Path

import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from resnet_flax.data import DataError, ImageData

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
CACHE_FORMAT_VERSION = 1  # Bump when the cached arrays change meaning.
_LAYOUT = '<root>/train/<class>/*.jpg and <root>/test/<class>/*.jpg'


@dataclasses.dataclass(frozen=True)
class SplitListing:
  """The image files of one split, in label order, and their cache key."""

  directory: Path
  paths: list[str]
  labels: np.ndarray  # int32 [N]
  class_names: tuple[str, ...]
  cache_key: str


def load(data_config: ml_collections.ConfigDict) -> dict[str, ImageData]:
  root = _check_root(data_config.path)
  cache_dirs = _cache_dirs(root, data_config.cache_dir)
  train = list_split(root, 'train')
  test = list_split(root, 'test', train.class_names)
  reference_image = train.paths[0]  # Both splits must have this image's size.
  return {
    'train': _load_split(train, reference_image, cache_dirs),
    'test': _load_split(test, reference_image, cache_dirs),
  }


def _check_root(path: str) -> Path:
  if not path:
    raise DataError(f'data.path is empty: set --config.data.path=<root>, a folder with {_LAYOUT}')
  root = Path(path).expanduser()
  if not root.is_dir():
    raise DataError(f'data.path {root} is not a directory: point --config.data.path at a folder with {_LAYOUT}')
  return root


def list_split(root: Path, split: str, class_names: tuple[str, ...] | None = None) -> SplitListing:
  """Lists `<root>/<split>`; `class_names` (train's) fixes the labels, else its own subdirectories do."""
  directory = root / split
  if not directory.is_dir():
    raise DataError(f'{directory} does not exist: an image folder needs {_LAYOUT.replace("<root>", str(root))}')
  found = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir() and not entry.name.startswith('.'))
  if not found:
    raise DataError(f'{directory} has no class subdirectories: put its images in {directory}/<class>/')
  class_names = class_names or tuple(found)
  unknown = sorted(set(found) - set(class_names))
  if unknown:
    raise DataError(
      f'{directory} has classes {unknown} that {root / "train"} lacks: add them to train or remove them from test'
    )
  paths, labels, key = [], [], hashlib.sha256(f'{CACHE_FORMAT_VERSION}\n{class_names}\n'.encode())
  for label, name in enumerate(class_names):
    if name not in found:
      continue  # A train class that test lacks.
    for entry in _image_entries(directory / name):
      stat = entry.stat()
      key.update(f'{name}/{entry.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n'.encode())
      paths.append(entry.path)
      labels.append(label)
  return SplitListing(directory, paths, np.array(labels, np.int32), class_names, key.hexdigest()[:32])


def is_image(name: str) -> bool:
  """The listing rule for a file: an image extension in any case, and a name that does not start with '.'."""
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith('.')


def _image_entries(class_dir: Path) -> list[os.DirEntry]:
  entries = sorted(
    (entry for entry in os.scandir(class_dir) if is_image(entry.name) and entry.is_file()), key=lambda entry: entry.name
  )
  if not entries:
    raise DataError(f'{class_dir} has no {"/".join(IMAGE_EXTENSIONS)} images: add some or remove the directory')
  return entries


def images_under(directory: str) -> list[str]:
  """Every image under `directory` and its subfolders (hidden ones skipped), sorted by path."""
  found = []
  for root, dirs, files in os.walk(directory):
    dirs[:] = [d for d in dirs if not d.startswith('.')]
    found += [os.path.join(root, name) for name in files if is_image(name)]
  if not found:
    raise DataError(f'{directory} has no {"/".join(IMAGE_EXTENSIONS)} images: give another folder')
  return sorted(found)


def _load_split(listing: SplitListing, reference_image: str, cache_dirs: list[Path]) -> ImageData:
  name = f'{listing.directory.name}-{listing.cache_key}.npz'
  for cache_dir in cache_dirs:
    data = read_cache(cache_dir / name)
    if data is not None:
      logging.info('loaded %d images from cache %s', len(data), cache_dir / name)
      return data
  start = time.perf_counter()
  data = ImageData(decode_images(listing.paths, reference_image), listing.labels, listing.class_names)
  seconds = time.perf_counter() - start
  cache_path = write_cache(data, cache_dirs, name)
  logging.info(
    'decoded %d images from %s in %.1f s; cached at %s',
    len(data),
    listing.directory,
    seconds,
    cache_path or 'nowhere (no writable cache directory)',
  )
  return data


def decode_images(paths: list[str], reference_image: str) -> np.ndarray:
  """Decodes `paths` into one uint8 [N, H, W, 3] array; each must have `reference_image`'s size."""
  height, width, _ = _decode(reference_image).shape
  images = np.empty((len(paths), height, width, 3), np.uint8)
  for i, path in enumerate(paths):
    image = _decode(path)
    if image.shape != images.shape[1:]:
      raise DataError(
        f'{path} is {image.shape[1]}x{image.shape[0]} pixels but {reference_image} is '
        f'{width}x{height}: all images must have one size; resize the folder beforehand'
      )
    images[i] = image
  return images


def _decode(path: str) -> np.ndarray:
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert('RGB'))
  except (OSError, SyntaxError, ValueError) as e:  # Pillow's errors for broken files (SyntaxError: PNG).
    raise DataError(f'cannot decode {path} ({e}): replace or delete the file') from e


def _cache_dirs(root: Path, cache_dir: str) -> list[Path]:
  if cache_dir:
    return [Path(cache_dir).expanduser()]
  return [root / '.resnet_flax_cache', Path.home() / '.cache' / 'resnet_flax']


def read_cache(path: Path) -> ImageData | None:
  """The split cached at `path`, or None when there is none or it cannot be read."""
  try:
    with np.load(path, allow_pickle=False) as arrays:
      labels, class_names = arrays['labels'], tuple(arrays['class_names'].tolist())
      images = _map_stored_npy(path, arrays.zip.getinfo('images.npy'))
    return ImageData(images, labels, class_names)
  except FileNotFoundError:
    return None
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    logging.warning('ignoring unreadable cache %s (%s); decoding the images again', path, e)
    return None


def _map_stored_npy(path: Path, member: zipfile.ZipInfo) -> np.ndarray:
  """Memory-maps (copy-on-write) an uncompressed .npy member of an .npz, which `np.load` cannot.

  Reading would copy the images into fresh memory, and faulting in fresh memory is the slow part of a
  cached load; mapped pages come from the page cache.
  """
  if member.compress_type != zipfile.ZIP_STORED:
    raise ValueError(f'{member.filename} is compressed')
  with open(path, 'rb') as f:
    f.seek(member.header_offset)
    local_header = f.read(30)  # The zip local file header; the name and an extra field follow it.
    if local_header[:4] != b'PK\x03\x04':
      raise ValueError(f'no zip member at offset {member.header_offset}')
    name_length, extra_length = struct.unpack('<HH', local_header[26:30])
    f.seek(member.header_offset + 30 + name_length + extra_length)
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(f)
    offset = f.tell()
  return np.asarray(np.memmap(path, dtype, 'c', offset, shape, 'F' if fortran_order else 'C'))


def write_cache(data: ImageData, cache_dirs: list[Path], name: str) -> Path | None:
  """Writes `data` as `name` in the first writable of `cache_dirs`; returns where, or None."""
  for cache_dir in cache_dirs:
    try:
      cache_dir.mkdir(parents=True, exist_ok=True)
      return _write_atomically(data, cache_dir / name)
    except OSError as e:
      logging.info('cannot cache in %s (%s)', cache_dir, e)
  logging.warning(
    'no writable cache directory among %s: the images will be decoded again next time; '
    'set --config.data.cache_dir to a writable directory',
    [str(d) for d in cache_dirs],
  )
  return None


def _write_atomically(data: ImageData, path: Path) -> Path:
  fd, temp_path = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      os.chmod(temp_path, 0o644)  # mkstemp makes it private; whoever may read the images may read this.
      np.savez(f, images=data.images, labels=data.labels, class_names=np.array(data.class_names))
    os.replace(temp_path, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(temp_path)
    raise
  return path
