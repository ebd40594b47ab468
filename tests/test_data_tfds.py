"""tfds source: fails fast offline, reads a prepared dataset, imports TensorFlow only when loading."""

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from configs import default
from resnet_flax.data import DataError, tfds_source

ROOT = Path(__file__).resolve().parents[1]
TINY_CLASSES = ('cat', 'dog', 'emu')


def data_config(path, name='cifar10'):
  config = default.get_config().data
  config.source, config.path, config.name = 'tfds', str(path), name
  return config


def tiny_examples(n: int, seed: int) -> list[dict]:
  rng = np.random.default_rng(seed)
  return [{'image': rng.integers(0, 256, (4, 5, 3), dtype=np.uint8), 'label': i % len(TINY_CLASSES)} for i in range(n)]


def prepare_tiny_dataset(data_dir: Path, splits: dict[str, list[dict]]):
  """Writes a prepared tfds dataset 'tiny_images' into `data_dir`, as `download_and_prepare` would."""
  import tensorflow_datasets as tfds

  class TinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      features = tfds.features.FeaturesDict(
        {'image': tfds.features.Image(shape=(4, 5, 3)), 'label': tfds.features.ClassLabel(names=TINY_CLASSES)}
      )
      return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(examples) for split, examples in splits.items()}

    def _generate_examples(self, examples):
      yield from enumerate(examples)

  TinyImages(data_dir=data_dir).download_and_prepare(
    download_config=tfds.download.DownloadConfig(try_download_gcs=False)
  )


@pytest.mark.parametrize(
  'name, archive', [('cifar10', 'cifar-10-python.tar.gz'), ('cifar100', 'cifar-100-python.tar.gz')]
)
def test_an_empty_data_dir_fails_fast_naming_the_offline_options(tmp_path, name, archive):
  start = time.perf_counter()
  with pytest.raises(DataError) as error:
    tfds_source.load(data_config(tmp_path, name))
  assert time.perf_counter() - start < 30
  message = str(error.value)
  assert f"tfds dataset '{name}' is not prepared in {tmp_path}/{name}/" in message
  assert f"tried tfds.builder('{name}', data_dir='{tmp_path}'), which never downloads" in message
  assert 'a prepared tfds data_dir (--config.data.path=<data_dir>)' in message
  assert f'(--config.data.source=cifar_archive --config.data.path=<{archive}>)' in message
  assert '\n' not in message
  assert list(tmp_path.iterdir()) == []  # Nothing was downloaded or created.


def test_an_unknown_dataset_name_is_a_data_error(tmp_path):
  with pytest.raises(DataError, match=r"tfds has no dataset 'no_such_dataset' \(tried tfds.builder"):
    tfds_source.load(data_config(tmp_path, 'no_such_dataset'))


def test_reads_a_prepared_dataset_fully(tmp_path):
  splits = {'train': tiny_examples(7, seed=0), 'test': tiny_examples(4, seed=1)}
  prepare_tiny_dataset(tmp_path, splits)
  loaded = tfds_source.load(data_config(tmp_path, 'tiny_images'))
  assert set(loaded) == {'train', 'test'}
  for split, examples in splits.items():
    assert loaded[split].class_names == TINY_CLASSES
    assert loaded[split].images.dtype == np.uint8 and loaded[split].labels.dtype == np.int32
    np.testing.assert_array_equal(loaded[split].images, np.stack([e['image'] for e in examples]))
    np.testing.assert_array_equal(loaded[split].labels, [e['label'] for e in examples])


def test_a_dataset_without_a_test_split_is_a_data_error(tmp_path):
  prepare_tiny_dataset(tmp_path, {'train': tiny_examples(3, seed=0)})
  with pytest.raises(DataError, match=r"tfds dataset 'tiny_images' has no test split \(it has \['train'\]\)"):
    tfds_source.load(data_config(tmp_path, 'tiny_images'))


def test_only_loading_from_tfds_imports_tensorflow():
  code = (
    'import sys\n'
    'from resnet_flax.data import cifar_archive, folder, synthetic, tfds_source\n'
    "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets')))"
  )
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
  assert out.strip() == '[]'
