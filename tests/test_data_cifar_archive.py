"""CIFAR archive source, on small archives written in the official byte layouts."""

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from configs import default
from resnet_flax.data import DataError, cifar_archive

from cifar_files import FORMATS, PER_BATCH, TEST_SIZE, make_archive, planar_rows


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
