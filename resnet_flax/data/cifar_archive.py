"""The official CIFAR-10 / CIFAR-100 downloads (www.cs.toronto.edu/~kriz/cifar.html), read offline.

`data.path` is one of (the format is told by the files inside, not by the name):
- python version: `cifar-10-python.tar.gz` or its `cifar-10-batches-py/` (data_batch_1..5, test_batch,
  batches.meta); `cifar-100-python.tar.gz` or its `cifar-100-python/` (train, test, meta);
- binary version: `cifar-10-binary.tar.gz` or its `cifar-10-batches-bin/` (data_batch_1..5.bin,
  test_batch.bin, batches.meta.txt);
- a directory holding one of these under its official name (the one of `data.name` when it holds both
  datasets).
Archives are read in memory with tarfile, never extracted. CIFAR-100 yields its 100 fine labels.

The python version is Python 2 pickles of dicts with bytes keys; images are uint8 [N, 3072] rows of
three 32x32 planes (R, G, B). They are unpickled with an allow-list of the few globals such files hold
(numpy arrays), so a tampered archive cannot run code.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import pickle
import posixpath
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from resnet_flax.data.dataset import DataError, ImageData

IMAGE_BYTES = 32 * 32 * 3


def _pixels(rows: np.ndarray) -> np.ndarray:
  """uint8 [N, 3072] channel-planar rows -> uint8 [N, 32, 32, 3]."""
  return np.ascontiguousarray(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


class _ArrayUnpickler(pickle.Unpickler):
  """Unpickles dicts, lists, bytes and numpy arrays only (what a CIFAR batch holds)."""

  ALLOWED = {
    ('numpy.core.multiarray', '_reconstruct'),
    ('numpy._core.multiarray', '_reconstruct'),
    ('numpy', 'ndarray'),
    ('numpy', 'dtype'),
    ('_codecs', 'encode'),
  }  # Python 3's protocol-2 spelling of bytes.

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) not in self.ALLOWED:
      raise pickle.UnpicklingError(f'{module}.{name} has no place in a CIFAR batch')
    return super().find_class(module, name)


def _unpickle(content: bytes, file_name: str, keys: tuple[str, ...]) -> list[Any]:
  """The values of `keys` in a pickled dict, written by Python 2 with bytes keys."""
  try:
    batch = _ArrayUnpickler(io.BytesIO(content), encoding='bytes').load()
    batch = {key.decode() if isinstance(key, bytes) else key: value for key, value in batch.items()}
  except Exception as e:  # Unpickling bad input raises almost any exception.
    raise DataError(f'{file_name} is not a readable CIFAR pickle ({e}): download the archive again') from e
  missing = [key for key in keys if key not in batch]
  if missing:
    raise DataError(f'{file_name} lacks {", ".join(missing)}: is it from another dataset? Download the archive again')
  return [batch[key] for key in keys]


def _read_pickled_batch(content: bytes, file_name: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
  data, labels = _unpickle(content, file_name, ('data', label_key))
  return _pixels(np.asarray(data, np.uint8)), np.asarray(labels, np.int32)


def _read_pickled_names(content: bytes, file_name: str, names_key: str) -> tuple[str, ...]:
  (names,) = _unpickle(content, file_name, (names_key,))
  return tuple(name.decode() if isinstance(name, bytes) else name for name in names)


def _read_binary_batch(content: bytes, file_name: str) -> tuple[np.ndarray, np.ndarray]:
  """Records of 1 label byte then 3072 pixel bytes."""
  if len(content) % (1 + IMAGE_BYTES):
    raise DataError(
      f'{file_name} is {len(content)} bytes, not a whole number of {1 + IMAGE_BYTES}-byte '
      'records: download the archive again'
    )
  records = np.frombuffer(content, np.uint8).reshape(-1, 1 + IMAGE_BYTES)
  return _pixels(records[:, 1:]), records[:, 0].astype(np.int32)


def _read_text_names(content: bytes, file_name: str) -> tuple[str, ...]:
  del file_name  # Reading text cannot fail.
  return tuple(line.strip() for line in content.decode(errors='replace').splitlines() if line.strip())


@dataclasses.dataclass(frozen=True)
class Layout:
  """One official layout: which files hold what, and how to read them."""

  description: str
  dataset: str  # The data.name it holds.
  names_file: str  # Holds the class names; its presence identifies the layout.
  train_files: tuple[str, ...]
  test_file: str
  read_batch: Callable[[bytes, str], tuple[np.ndarray, np.ndarray]]
  read_names: Callable[[bytes, str], tuple[str, ...]]

  @property
  def files(self) -> tuple[str, ...]:
    return (self.names_file, *self.train_files, self.test_file)


_CIFAR10_BATCHES = tuple(f'data_batch_{i}' for i in range(1, 6))
# A table, one layout per row:
# fmt: off
LAYOUTS = (
  Layout('CIFAR-10 python version', 'cifar10', 'batches.meta', _CIFAR10_BATCHES, 'test_batch',
         functools.partial(_read_pickled_batch, label_key='labels'),
         functools.partial(_read_pickled_names, names_key='label_names')),
  Layout('CIFAR-100 python version', 'cifar100', 'meta', ('train',), 'test',
         functools.partial(_read_pickled_batch, label_key='fine_labels'),
         functools.partial(_read_pickled_names, names_key='fine_label_names')),
  Layout('CIFAR-10 binary version', 'cifar10', 'batches.meta.txt', tuple(f'{b}.bin' for b in _CIFAR10_BATCHES),
         'test_batch.bin', _read_binary_batch, _read_text_names),
)
# fmt: on
# The official downloads and the directories they unpack to, with the data.name each holds.
OFFICIAL_NAMES = {
  'cifar-10-batches-py': 'cifar10',
  'cifar-100-python': 'cifar100',
  'cifar-10-batches-bin': 'cifar10',
  'cifar-10-python.tar.gz': 'cifar10',
  'cifar-100-python.tar.gz': 'cifar100',
  'cifar-10-binary.tar.gz': 'cifar10',
}
_ACCEPTED = (
  'expected cifar-10-python.tar.gz, cifar-10-batches-py/, cifar-100-python.tar.gz, cifar-100-python/, '
  'cifar-10-binary.tar.gz or cifar-10-batches-bin/ (or a directory holding one of them)'
)


def load(data_config: ml_collections.ConfigDict) -> dict[str, ImageData]:
  path = locate(data_config.path, data_config.name)
  files = _read_files(path, {name for layout in LAYOUTS for name in layout.files})
  layout = detect(files, path)
  if layout.dataset != data_config.name:
    raise DataError(
      f'{path} holds the {layout.description} but data.name={data_config.name!r}: '
      f'set --config.data.name={layout.dataset}'
    )
  class_names = layout.read_names(files[layout.names_file], layout.names_file)
  batches = [layout.read_batch(files[name], name) for name in layout.train_files]
  train = ImageData(
    np.concatenate([images for images, _ in batches]), np.concatenate([labels for _, labels in batches]), class_names
  )
  test = ImageData(*layout.read_batch(files[layout.test_file], layout.test_file), class_names)
  return {'train': train, 'test': test}


def locate(path: str, name: str) -> Path:
  """`path` itself, or the one official archive or directory of dataset `name` (else any) inside it."""
  if not path:
    raise DataError(f'data.path is empty: set --config.data.path to a CIFAR archive; {_ACCEPTED}')
  location = Path(path).expanduser()
  if not location.exists():
    raise DataError(f'data.path {location} does not exist: {_ACCEPTED}')
  if location.is_file() or any((location / layout.names_file).is_file() for layout in LAYOUTS):
    return location
  found = [location / official for official in OFFICIAL_NAMES if (location / official).exists()]
  candidates = [p for p in found if OFFICIAL_NAMES[p.name] == name] or found
  if len(candidates) > 1:
    raise DataError(
      f'{location} holds several CIFAR archives ({", ".join(p.name for p in candidates)}): '
      'point --config.data.path at one of them'
    )
  if not candidates:
    raise DataError(f'{location} holds no CIFAR archive: {_ACCEPTED}')
  return candidates[0]


def _read_files(path: Path, wanted: set[str]) -> dict[str, bytes]:
  """The contents of the files of `path` (a directory or a tar archive) whose base name is wanted."""
  if path.is_dir():
    return {name: (path / name).read_bytes() for name in wanted if (path / name).is_file()}
  try:
    with tarfile.open(path) as archive:
      return {
        posixpath.basename(member.name): archive.extractfile(member).read()
        for member in archive
        if member.isfile() and posixpath.basename(member.name) in wanted
      }
  except tarfile.ReadError as e:  # Its message lists every compression tried, one per line.
    raise DataError(f'{path} is not a tar archive, or a damaged one: {_ACCEPTED}') from e
  except (tarfile.TarError, OSError, EOFError) as e:  # A bad gzip stream raises OSError or EOFError.
    raise DataError(f'{path} is not a readable CIFAR archive ({e}): {_ACCEPTED}') from e


def detect(files: dict[str, bytes], path: Path) -> Layout:
  """The layout whose class-names file is among `files`, checked to have all its batches."""
  layout = next((layout for layout in LAYOUTS if layout.names_file in files), None)
  if layout is None:
    raise DataError(f'{path} is not a CIFAR archive: {_ACCEPTED}')
  missing = [name for name in layout.files if name not in files]
  if missing:
    raise DataError(
      f'{path} looks like the {layout.description} but lacks {", ".join(missing)}: download the archive again'
    )
  return layout
