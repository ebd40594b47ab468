"""CIFAR archive source, on small archives written in the official byte layouts."""

import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

from configs import default
from resnet_flax.data import DataError, cifar_archive

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


def data_config(path, name='cifar10'):
  config = default.get_config().data
  config.source, config.path, config.name = 'cifar_archive', str(path), name
  return config


@pytest.mark.parametrize('packing', ['dir', 'tar.gz', 'parent'])
@pytest.mark.parametrize('fmt', list(FORMATS))
def test_reads_labels_pixels_and_class_names_exactly(tmp_path, fmt, packing):
  path, expected = make_archive(tmp_path, fmt, packing)
  splits = cifar_archive.load(data_config(path, FORMATS[fmt][3]))
  assert set(splits) == {'train', 'test'}
  for split in ('train', 'test'):
    images, labels = expected[split]
    assert splits[split].class_names == expected['class_names']
    assert splits[split].images.dtype == np.uint8 and splits[split].labels.dtype == np.int32
    np.testing.assert_array_equal(splits[split].images, images)
    np.testing.assert_array_equal(splits[split].labels, labels)
  assert len(splits['train']) == (11 if fmt == 'cifar100_python' else 5 * PER_BATCH)
  assert len(splits['test']) == TEST_SIZE


def test_pickles_are_python2_style_and_load_with_both_encodings(tmp_path):
  path, expected = make_archive(tmp_path, 'cifar10_python', 'dir')
  raw = (path / 'data_batch_1').read_bytes()
  assert b'_codecs' not in raw and b'numpy.core.multiarray\n' in raw  # No Python 3 spelling of bytes.
  as_bytes, as_latin1 = pickle.loads(raw, encoding='bytes'), pickle.loads(raw, encoding='latin1')
  assert set(as_bytes) == {b'batch_label', b'labels', b'data', b'filenames'}
  assert set(as_latin1) == {'batch_label', 'labels', 'data', 'filenames'}
  for batch, key in ((as_bytes, b'data'), (as_latin1, 'data')):
    assert batch[key].dtype == np.uint8 and batch[key].shape == (PER_BATCH, 3072)
    np.testing.assert_array_equal(batch[key], planar_rows(expected['train'][0][:PER_BATCH]))


def test_wrong_data_name_says_which_to_set(tmp_path):
  path, _ = make_archive(tmp_path, 'cifar100_python', 'tar.gz')
  with pytest.raises(
    DataError,
    match=r'holds the CIFAR-100 python version but data.name=.cifar10.: '
    r'set --config.data.name=cifar100$',
  ):
    cifar_archive.load(data_config(path, 'cifar10'))


def test_a_parent_holding_both_datasets_picks_data_name(tmp_path):
  make_archive(tmp_path, 'cifar10_python', 'tar.gz')
  make_archive(tmp_path, 'cifar100_python', 'dir')
  assert len(cifar_archive.load(data_config(tmp_path, 'cifar100'))['train'].class_names) == 100
  assert len(cifar_archive.load(data_config(tmp_path, 'cifar10'))['train'].class_names) == 10


def test_a_parent_holding_two_copies_asks_for_one(tmp_path):
  make_archive(tmp_path / 'a', 'cifar10_python', 'tar.gz')
  make_archive(tmp_path / 'a', 'cifar10_binary', 'dir')
  with pytest.raises(DataError, match='holds several CIFAR archives .* point --config.data.path at one of them'):
    cifar_archive.load(data_config(tmp_path / 'a'))


def test_an_unrecognised_directory_lists_the_accepted_layouts(tmp_path):
  (tmp_path / 'notes.txt').write_text('not CIFAR')
  with pytest.raises(
    DataError,
    match='holds no CIFAR archive: expected cifar-10-python.tar.gz, cifar-10-batches-py/, '
    r'cifar-100-python.tar.gz, cifar-100-python/, cifar-10-binary.tar.gz or '
    r'cifar-10-batches-bin/ \(or a directory holding one of them\)$',
  ):
    cifar_archive.load(data_config(tmp_path))


def test_missing_path_and_missing_batch(tmp_path):
  with pytest.raises(DataError, match=f'data.path {tmp_path}/nowhere does not exist: expected'):
    cifar_archive.load(data_config(tmp_path / 'nowhere'))
  with pytest.raises(DataError, match='data.path is empty'):
    cifar_archive.load(data_config(''))
  path, _ = make_archive(tmp_path, 'cifar10_python', 'dir')
  (path / 'data_batch_3').unlink()
  with pytest.raises(DataError, match='looks like the CIFAR-10 python version but lacks data_batch_3: download'):
    cifar_archive.load(data_config(path))


def test_a_truncated_binary_batch_is_an_error(tmp_path):
  path, _ = make_archive(tmp_path, 'cifar10_binary', 'dir')
  (path / 'test_batch.bin').write_bytes((path / 'test_batch.bin').read_bytes()[:-1])
  with pytest.raises(DataError, match='test_batch.bin is 15364 bytes, not a whole number of 3073-byte records'):
    cifar_archive.load(data_config(path))


class _RunsCode:
  def __init__(self, marker: Path):
    self.marker = marker

  def __reduce__(self):
    return os.mkdir, (str(self.marker),)


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
  path, _ = make_archive(tmp_path, 'cifar10_python', 'dir')
  marker = tmp_path / 'code_ran'
  with open(path / 'test_batch', 'wb') as f:
    pickle.dump({b'data': _RunsCode(marker), b'labels': []}, f, protocol=2)
  with pytest.raises(DataError, match=r'test_batch is not a readable CIFAR pickle \(posix.mkdir has no place'):
    cifar_archive.load(data_config(path))
  assert not marker.exists()


@pytest.mark.parametrize('content', [b'', b'not an archive', b'\x1f\x8b' + bytes(100)])
def test_a_file_that_is_not_a_tar_is_a_one_line_error(tmp_path, content):
  (tmp_path / 'cifar-10-python.tar.gz').write_bytes(content)
  with pytest.raises(DataError, match='cifar-10-python.tar.gz is not a (tar|readable CIFAR) archive') as error:
    cifar_archive.load(data_config(tmp_path / 'cifar-10-python.tar.gz'))
  assert '\n' not in str(error.value)


def test_an_archive_without_cifar_files_is_an_error(tmp_path):
  with pytest.raises(DataError, match='is not a CIFAR archive'):
    cifar_archive.load(data_config(_empty_tar(tmp_path / 'empty.tar.gz')))


def _empty_tar(path: Path) -> Path:
  with tarfile.open(path, 'w:gz') as archive:
    archive.addfile(tarfile.TarInfo('readme.txt'), io.BytesIO(b''))
  return path
