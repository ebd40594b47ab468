"""Small CIFAR files in the official byte layouts, shared by the tests of the sources that read them.

The python version is written as Python 2's cPickle wrote it (py2 `str` for every string, numpy 1's module
names), so that readers are tested on what the real download holds.
"""

import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np

PER_BATCH, TEST_SIZE = 7, 5
_RECONSTRUCT = np.zeros(1).__reduce__()[0]


class Python2Pickler(pickle._Pickler):
  """Writes what Python 2's cPickle wrote: every str and bytes as a py2 `str` (BINSTRING), numpy 1 names."""

  dispatch = dict(pickle._Pickler.dispatch)

  def save_py2_str(self, obj):
    data = obj.encode('latin1') if isinstance(obj, str) else obj
    if len(data) < 256:
      self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
    else:
      self.write(pickle.BINSTRING + struct.pack('<i', len(data)) + data)
    self.memoize(obj)

  dispatch[bytes] = dispatch[str] = save_py2_str

  def save_global(self, obj, name=None):
    if obj is _RECONSTRUCT:  # numpy 2 says numpy._core, which Python 2's numpy never wrote.
      self.write(pickle.GLOBAL + b'numpy.core.multiarray\n_reconstruct\n')
      self.memoize(obj)
    else:
      super().save_global(obj, name)


def write_pickle(path: Path, obj: dict):
  with open(path, 'wb') as f:
    Python2Pickler(f, protocol=2).dump(obj)


def random_images(rng, n: int) -> np.ndarray:
  """uint8 [n, 32, 32, 3] with disjoint value ranges per channel: a channel mix-up cannot go unseen."""
  return np.stack([rng.integers(c * 85, c * 85 + 85, (n, 32, 32), dtype=np.uint8) for c in range(3)], axis=-1)


def planar_rows(images: np.ndarray) -> np.ndarray:
  """The official storage: each row is the R plane, then G, then B (uint8 [n, 3072])."""
  return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def make_split(rng, n: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  return random_images(rng, n), rng.integers(0, num_classes, n).astype(np.int32)


def write_cifar10_python(directory: Path, rng) -> dict:
  directory.mkdir(parents=True)
  class_names = tuple(f'class{i}' for i in range(10))
  write_pickle(
    directory / 'batches.meta',
    {b'label_names': [n.encode() for n in class_names], b'num_cases_per_batch': PER_BATCH, b'num_vis': 3072},
  )
  batches = [make_split(rng, PER_BATCH, 10) for _ in range(5)] + [make_split(rng, TEST_SIZE, 10)]
  for name, (images, labels) in zip([f'data_batch_{i}' for i in range(1, 6)] + ['test_batch'], batches, strict=True):
    write_pickle(
      directory / name,
      {
        b'batch_label': f'{name} of 5'.encode(),
        b'labels': labels.tolist(),
        b'data': planar_rows(images),
        b'filenames': [f'{i}.png'.encode() for i in range(len(labels))],
      },
    )
  return {
    'class_names': class_names,
    'train': [np.concatenate(a) for a in zip(*batches[:5], strict=True)],
    'test': batches[5],
  }


def write_cifar100_python(directory: Path, rng) -> dict:
  directory.mkdir(parents=True)
  class_names = tuple(f'fine{i:02d}' for i in range(100))
  write_pickle(
    directory / 'meta',
    {
      b'fine_label_names': [n.encode() for n in class_names],
      b'coarse_label_names': [f'coarse{i}'.encode() for i in range(20)],
    },
  )
  splits = {'train': make_split(rng, 11, 100), 'test': make_split(rng, TEST_SIZE, 100)}
  for name, (images, labels) in splits.items():
    write_pickle(
      directory / name,
      {
        b'batch_label': name.encode(),
        b'fine_labels': labels.tolist(),
        b'coarse_labels': (labels // 5).tolist(),
        b'data': planar_rows(images),
        b'filenames': [f'{i}.png'.encode() for i in range(len(labels))],
      },
    )
  return {'class_names': class_names, **splits}


def write_cifar10_binary(directory: Path, rng) -> dict:
  directory.mkdir(parents=True)
  class_names = tuple(f'class{i}' for i in range(10))
  (directory / 'batches.meta.txt').write_text('\n'.join(class_names) + '\n\n')  # As official: blank line last.
  batches = [make_split(rng, PER_BATCH, 10) for _ in range(5)] + [make_split(rng, TEST_SIZE, 10)]
  for name, (images, labels) in zip(
    [f'data_batch_{i}.bin' for i in range(1, 6)] + ['test_batch.bin'], batches, strict=True
  ):
    records = np.concatenate([labels.astype(np.uint8)[:, None], planar_rows(images)], axis=1)
    (directory / name).write_bytes(records.tobytes())
  return {
    'class_names': class_names,
    'train': [np.concatenate(a) for a in zip(*batches[:5], strict=True)],
    'test': batches[5],
  }


# Official extracted-directory name, official archive name, writer, data.name.
FORMATS = {
  'cifar10_python': ('cifar-10-batches-py', 'cifar-10-python.tar.gz', write_cifar10_python, 'cifar10'),
  'cifar100_python': ('cifar-100-python', 'cifar-100-python.tar.gz', write_cifar100_python, 'cifar100'),
  'cifar10_binary': ('cifar-10-batches-bin', 'cifar-10-binary.tar.gz', write_cifar10_binary, 'cifar10'),
}


def make_archive(tmp_path: Path, fmt: str, packing: str, seed: int = 0) -> tuple[Path, dict]:
  """Writes format `fmt`; returns the data.path for `packing` (dir | tar.gz | parent) and the expected data."""
  dir_name, archive_name, write, _ = FORMATS[fmt]
  directory = tmp_path / dir_name
  expected = write(directory, np.random.default_rng(seed))
  if packing == 'tar.gz':
    with tarfile.open(tmp_path / archive_name, 'w:gz') as archive:
      archive.add(directory, arcname=dir_name)
    for file in directory.iterdir():  # Only the archive is left: it must be read, not the directory.
      file.unlink()
    directory.rmdir()
    return tmp_path / archive_name, expected
  return (tmp_path if packing == 'parent' else directory), expected
