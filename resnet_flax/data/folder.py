"""Image folders: `<root>/{train,test}/<class>/*.jpg` and optionally `<root>/val/` (or `validation/`).

This is tfds.ImageFolder's layout. Class names are the sorted subdirectories of `<root>/train` and
label i is `class_names[i]`. The other splits use the same list: a class that train lacks is an
error, a train class that they lack is fine. Files are listed by extension in any case
(`images.IMAGE_EXTENSIONS`); other files, and names starting with '.' (macOS `._x.jpg` companions,
`.ipynb_checkpoints`), are skipped.

Images are decoded by `images.load_image` (Pillow; EXIF orientation, any mode to RGB). With
`data.image_size` > 0 every image is resized to that square size by `data.resize`, once, at decode;
with 0 every image must already have the size of the first training image (another size is an error
naming both files and the fix). An undecodable file is an error naming it.

Decoding runs on one core: a thread pool was slower (the per-file work is Python, under the GIL)
and a 2-process pool no faster while using more CPU (workers must be spawned, since forking once
JAX has started threads may deadlock, and the arrays come back pickled). Caching pays:

Each split is decoded straight into a .npy memory map in `data.cache_dir`, or by default in
`<root>/.resnet_flax_cache/`, falling back to `~/.cache/resnet_flax/` when the root is read-only;
with no writable place it is decoded into memory every time (a warning says so). So a split is never
held in memory twice, and later loads map the file (copy-on-write) instead of reading it: pages come
from the page cache as the pipeline touches them. The cache key hashes a format version, the size
and resize policy, the class list and every file's relative path, size and mtime_ns (no file is
read), so an added, removed or changed file makes a new key and the stale cache is simply not used
(it is not deleted). The file is filled under a temporary name and renamed when complete, so a killed
run never leaves a broken one; an unreadable cache is ignored with a warning and rebuilt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from resnet_flax.data import images
from resnet_flax.data.dataset import DataError, ImageData

CACHE_FORMAT_VERSION = 2  # Bump when the cached arrays change meaning.
VALIDATION_DIRS = ('val', 'validation')
_LAYOUT = '<root>/train/<class>/*.jpg and <root>/test/<class>/*.jpg'


@dataclasses.dataclass(frozen=True)
class SplitListing:
  """The image files of one split, in label order, and a hash of their names, sizes and times."""

  directory: Path
  paths: list[str]
  labels: np.ndarray  # int32 [N]
  class_names: tuple[str, ...]
  files_key: str


@dataclasses.dataclass(frozen=True)
class Decoding:
  """How a split's files become pixels: resized to `size` by `policy`, or (`reference` set) required
  to have `size` already, the size of the `reference` image."""

  size: images.Size
  policy: str
  reference: str | None = None

  @classmethod
  def of(cls, data_config: ml_collections.ConfigDict, first_image: str) -> Decoding:
    if data_config.image_size:
      return cls((data_config.image_size,) * 2, data_config.resize)
    height, width, _ = images.load_image(first_image, None, data_config.resize).shape
    return cls((height, width), data_config.resize, reference=first_image)

  def key(self) -> str:
    return f'{self.size} {"as is" if self.reference else f"{self.policy} {images.RESAMPLING.name}"}'


def load(data_config: ml_collections.ConfigDict) -> dict[str, ImageData]:
  root = _check_root(data_config.path)
  cache_dirs = _cache_dirs(root, data_config.cache_dir)
  listings = {'train': list_split(root, 'train')}
  class_names = listings['train'].class_names
  listings['test'] = list_split(root, 'test', class_names)
  validation_dir = _validation_dir(root)
  if validation_dir:
    listings['validation'] = list_split(root, validation_dir, class_names)
  decoding = Decoding.of(data_config, listings['train'].paths[0])
  return {split: _load_split(listing, decoding, cache_dirs) for split, listing in listings.items()}


def load_test(data_config: ml_collections.ConfigDict) -> ImageData:
  """The test split alone, labelled by train's classes where `<root>/train` exists, else by its own."""
  root = _check_root(data_config.path)
  class_names = list_split(root, 'train').class_names if (root / 'train').is_dir() else None
  listing = list_split(root, 'test', class_names)
  decoding = Decoding.of(data_config, listing.paths[0])
  return _load_split(listing, decoding, _cache_dirs(root, data_config.cache_dir))


def _check_root(path: str) -> Path:
  if not path:
    raise DataError(f'data.path is empty: set --config.data.path=<root>, a folder with {_LAYOUT}')
  root = Path(path).expanduser()
  if not root.is_dir():
    raise DataError(f'data.path {root} is not a directory: point --config.data.path at a folder with {_LAYOUT}')
  return root


def _validation_dir(root: Path) -> str | None:
  found = [name for name in VALIDATION_DIRS if (root / name).is_dir()]
  if len(found) > 1:
    raise DataError(f'{root} has both {" and ".join(found)}/: keep one validation folder')
  return found[0] if found else None


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
      f'{directory} has classes {unknown} that {root / "train"} lacks: add them to train or remove them from {split}'
    )
  paths, labels, key = [], [], hashlib.sha256(f'{CACHE_FORMAT_VERSION}\n{class_names}\n'.encode())
  for label, name in enumerate(class_names):
    if name not in found:
      continue  # A train class that this split lacks.
    for entry in _image_entries(directory / name):
      stat = entry.stat()
      key.update(f'{name}/{entry.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n'.encode())
      paths.append(entry.path)
      labels.append(label)
  return SplitListing(directory, paths, np.array(labels, np.int32), class_names, key.hexdigest())


def is_image(name: str) -> bool:
  """The listing rule for a file: an image extension in any case, and a name that does not start with '.'."""
  return name.lower().endswith(images.IMAGE_EXTENSIONS) and not name.startswith('.')


def _image_entries(class_dir: Path) -> list[os.DirEntry]:
  entries = sorted(
    (entry for entry in os.scandir(class_dir) if is_image(entry.name) and entry.is_file()), key=lambda entry: entry.name
  )
  if not entries:
    raise DataError(f'{class_dir} has no images ({"/".join(images.IMAGE_EXTENSIONS)}): add some or remove it')
  return entries


def images_under(directory: str) -> list[str]:
  """Every image under `directory` and its subfolders (hidden ones skipped), sorted by path."""
  found = []
  for root, dirs, files in os.walk(directory):
    dirs[:] = [d for d in dirs if not d.startswith('.')]
    found += [os.path.join(root, name) for name in files if is_image(name)]
  if not found:
    raise DataError(f'{directory} has no images ({"/".join(images.IMAGE_EXTENSIONS)}): give another folder')
  return sorted(found)


def expand_folder(item: Any) -> list[Any]:
  """The images under `item` (`images_under`) where it is a path (str or os.PathLike) of a folder, else [`item`]:
  how `--mode=predict`, `--mode=explain` and the Python API take files and folders alike."""
  is_folder = isinstance(item, (str, os.PathLike)) and os.path.isdir(item)
  return images_under(os.fspath(item)) if is_folder else [item]


def _load_split(listing: SplitListing, decoding: Decoding, cache_dirs: list[Path]) -> ImageData:
  key = hashlib.sha256(f'{listing.files_key}\n{decoding.key()}'.encode()).hexdigest()[:32]
  name = f'{listing.directory.name}-{key}.npy'
  shape = (len(listing.paths), *decoding.size, 3)
  for cache_dir in cache_dirs:
    cached = read_cache(cache_dir / name, shape)
    if cached is not None:
      logging.info('loaded %d images from cache %s', len(cached), cache_dir / name)
      return ImageData(cached, listing.labels, listing.class_names)
  start = time.perf_counter()
  with cache_array(cache_dirs, name, shape) as (array, cache_path):
    decode_images(listing.paths, decoding, into=array)
  logging.info(
    'decoded %d images from %s in %.1f s; cached at %s',
    len(listing.paths),
    listing.directory,
    time.perf_counter() - start,
    cache_path or 'nowhere (no writable cache directory)',
  )
  pixels = array if cache_path is None else read_cache(cache_path, shape)
  return ImageData(pixels, listing.labels, listing.class_names)


def decode_images(paths: list[str], decoding: Decoding, into: np.ndarray | None = None) -> np.ndarray:
  """Decodes `paths` into `into` (or a new uint8 [N, H, W, 3] array) as `decoding` says; returns it."""
  into = np.empty((len(paths), *decoding.size, 3), np.uint8) if into is None else into
  height, width = decoding.size
  for i, path in enumerate(paths):
    image = images.load_image(path, None if decoding.reference else decoding.size, decoding.policy)
    if image.shape != into.shape[1:]:
      raise DataError(
        f'{path} is {image.shape[1]}x{image.shape[0]} pixels but {decoding.reference} is {width}x{height}: '
        'set --config.data.image_size=<pixels> to resize every image to one square size'
      )
    into[i] = image
  return into


def _cache_dirs(root: Path, cache_dir: str) -> list[Path]:
  if cache_dir:
    return [Path(cache_dir).expanduser()]
  return [root / '.resnet_flax_cache', Path.home() / '.cache' / 'resnet_flax']


def read_cache(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
  """The images cached at `path` memory-mapped (copy-on-write), or None when absent or unreadable."""
  try:
    cached = np.load(path, mmap_mode='c', allow_pickle=False)
  except (FileNotFoundError, NotADirectoryError):
    return None
  except (OSError, ValueError, EOFError) as e:
    logging.warning('ignoring unreadable cache %s (%s); decoding the images again', path, e)
    return None
  if cached.shape != shape or cached.dtype != np.uint8:
    logging.warning(
      'ignoring cache %s of %s %s, not uint8 %s; decoding the images again', path, cached.dtype, cached.shape, shape
    )
    return None
  return cached


@contextlib.contextmanager
def cache_array(cache_dirs: list[Path], name: str, shape: tuple[int, ...]) -> Iterator[tuple[np.ndarray, Path | None]]:
  """An array to fill, memory-mapped from a temporary file in the first of `cache_dirs` with room for it,
  and the path it is renamed to once filled; or an in-memory array and None where there is none."""
  for cache_dir in cache_dirs:
    temp_path = None
    try:
      cache_dir.mkdir(parents=True, exist_ok=True)
      fd, temp_path = tempfile.mkstemp(dir=cache_dir, prefix=f'.{name}.', suffix='.tmp')
      os.close(fd)
      os.chmod(temp_path, 0o644)  # mkstemp makes it private; whoever may read the images may read this.
      array = np.lib.format.open_memmap(temp_path, 'w+', np.uint8, shape)
      _reserve_disk_space(temp_path)
      break
    except OSError as e:
      _remove(temp_path)
      logging.info('cannot cache in %s (%s)', cache_dir, e)
  else:
    logging.warning(
      'no cache directory among %s is writable with room for %.1f GB: the images will be decoded again next '
      'time; set --config.data.cache_dir to a writable directory',
      [str(d) for d in cache_dirs],
      np.prod(shape) / 1e9,
    )
    yield np.empty(shape, np.uint8), None
    return
  try:
    yield array, cache_dir / name
    array.flush()
    os.replace(temp_path, cache_dir / name)
  except BaseException:
    _remove(temp_path)
    raise


def _remove(path: str | None) -> None:
  if path:
    with contextlib.suppress(OSError):
      os.unlink(path)


def _reserve_disk_space(path: str) -> None:
  """Allocates the file's blocks now: writing a memory map onto a full disk would kill the process
  (SIGBUS) instead of raising an error."""
  if hasattr(os, 'posix_fallocate'):
    with open(path, 'r+b') as f:
      os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
