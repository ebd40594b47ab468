"""tfds source: downloads with tfds's download manager (from a loopback server here), fails fast offline,
reads prepared datasets of one or varying sizes, imports TensorFlow only when loading.

Nothing here leaves 127.0.0.1: the downloads come from a local HTTP server, proxies are bypassed.
"""

import functools
import http.server
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from configs import default
from resnet_flax.data import DataError, images, tfds_source

from cifar_files import make_archive

ROOT = Path(__file__).resolve().parents[1]
TINY_CLASSES = ('cat', 'dog', 'emu')


def data_config(path, name='cifar10', **fields):
  config = default.get_config().data
  config.source, config.path, config.name = 'tfds', str(path), name
  config.update(fields)
  return config


def tiny_examples(n: int, seed: int, sizes: tuple[tuple[int, int], ...] = ((4, 5),)) -> list[dict]:
  """Random RGB images cycling through `sizes` (height, width), labels cycling through the classes."""
  rng = np.random.default_rng(seed)
  return [
    {'image': rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8), 'label': i % len(TINY_CLASSES)}
    for i in range(n)
  ]


def prepare_tiny_dataset(data_dir: Path, splits: dict[str, list[dict]], shape=(4, 5, 3)):
  """Writes a prepared tfds dataset 'tiny_images' into `data_dir`, as `download_and_prepare` would."""
  import tensorflow_datasets as tfds

  class TinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      features = tfds.features.FeaturesDict(
        {'image': tfds.features.Image(shape=shape), 'label': tfds.features.ClassLabel(names=TINY_CLASSES)}
      )
      return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(examples) for split, examples in splits.items()}

    def _generate_examples(self, examples):
      yield from enumerate(examples)

  TinyImages(data_dir=data_dir).download_and_prepare(
    download_config=tfds.download.DownloadConfig(try_download_gcs=False)
  )


@functools.cache
def loopback_cifar10() -> type:
  """tfds's own CIFAR-10 builder, registered as 'loopback_cifar10', downloading `url` instead.

  Only the address differs: tfds's download manager, its checksum check against `url_infos` (what the
  source also probes), its extraction and the real builder's parsing of the binary archive all run.
  Made once per process: tfds registers a builder class by its name.
  """
  from tensorflow_datasets.image_classification import cifar

  class LoopbackCifar10(cifar.Cifar10):
    url = ''
    url_infos = None  # {url: UrlInfo}: the registered checksums, read from checksums.tsv for real datasets.

    @property
    def _cifar_info(self):
      return super()._cifar_info._replace(url=self.url)

  return LoopbackCifar10


class _RecordingHandler(http.server.SimpleHTTPRequestHandler):
  """Records each request's method and path instead of printing it."""

  def log_request(self, code='-', size='-'):
    self.server.requests.append((self.command, self.path))

  def log_message(self, format, *args):
    pass


@pytest.fixture
def server(tmp_path, monkeypatch):
  """(root, base URL, requests seen) of an HTTP server on 127.0.0.1 serving the folder `root`."""
  for variable in ('no_proxy', 'NO_PROXY'):  # requests then never sends a request to a proxy.
    monkeypatch.setenv(variable, '*')
  root = tmp_path / 'www'
  root.mkdir()
  httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(_RecordingHandler, directory=root))
  httpd.requests = []
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield root, f'http://127.0.0.1:{httpd.server_address[1]}', httpd.requests
  httpd.shutdown()
  httpd.server_close()


def serve_cifar10(monkeypatch, root: Path, base_url: str, checksum: str = '') -> dict:
  """Serves a small cifar-10-binary.tar.gz (the file tfds's cifar10 downloads) and points the builder at it."""
  from tensorflow_datasets.core.download import checksums

  archive, expected = make_archive(root, 'cifar10_binary', 'tar.gz')
  url = f'{base_url}/{archive.name}'
  info = checksums.compute_url_info(archive)
  if checksum:
    info = checksums.UrlInfo(size=info.size, checksum=checksum, filename=info.filename)
  monkeypatch.setattr(loopback_cifar10(), 'url', url)
  monkeypatch.setattr(loopback_cifar10(), 'url_infos', {url: info})
  return expected


def by_pixels(images_: np.ndarray, labels: np.ndarray) -> list[tuple[bytes, int]]:
  """Examples in an order of their own: tfds shuffles the examples of cifar10 when it writes them."""
  return sorted((image.tobytes(), int(label)) for image, label in zip(images_, labels, strict=True))


def closed_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_downloads_and_prepares_a_missing_dataset_with_tfds(tmp_path, server, monkeypatch):
  root, base_url, requests_seen = server
  expected = serve_cifar10(monkeypatch, root, base_url)
  data_dir = tmp_path / 'data'
  loaded = tfds_source.load(data_config(data_dir, 'loopback_cifar10'))
  assert set(loaded) == {'train', 'test'}
  for split in ('train', 'test'):
    assert loaded[split].class_names == expected['class_names']
    assert loaded[split].images.dtype == np.uint8 and loaded[split].labels.dtype == np.int32
    assert by_pixels(loaded[split].images, loaded[split].labels) == by_pixels(*expected[split])
  assert requests_seen == [('HEAD', '/cifar-10-binary.tar.gz'), ('GET', '/cifar-10-binary.tar.gz')]
  assert (data_dir / 'downloads').is_dir()  # tfds's download manager's own place.
  monkeypatch.setattr(loopback_cifar10(), 'url', f'http://127.0.0.1:{closed_port()}/gone.tar.gz')
  again = tfds_source.load(data_config(data_dir, 'loopback_cifar10', download=False))  # Prepared: no network.
  np.testing.assert_array_equal(again['test'].images, loaded['test'].images)


def test_a_download_with_the_wrong_checksum_is_a_one_line_error(tmp_path, server, monkeypatch):
  root, base_url, _ = server
  serve_cifar10(monkeypatch, root, base_url, checksum='0' * 64)
  with pytest.raises(DataError) as error:
    tfds_source.load(data_config(tmp_path / 'data', 'loopback_cifar10'))
  message = str(error.value)
  assert "tfds dataset 'loopback_cifar10' is not prepared in" in message
  assert 'and downloading it failed (NonMatchingChecksumError: ' in message
  assert '\n' not in message


def test_an_unreachable_host_fails_fast_naming_the_offline_options(tmp_path, monkeypatch):
  monkeypatch.setenv('no_proxy', '*')
  port = closed_port()  # Nobody listens there: what a host looks like offline, answered at once.
  monkeypatch.setattr(loopback_cifar10(), 'url', f'http://127.0.0.1:{port}/cifar-10-binary.tar.gz')
  monkeypatch.setattr(loopback_cifar10(), 'url_infos', {loopback_cifar10().url: None})
  start = time.perf_counter()
  with pytest.raises(DataError) as error:
    tfds_source.load(data_config(tmp_path, 'loopback_cifar10'))
  assert time.perf_counter() - start < 30
  message = str(error.value)
  assert f"tfds dataset 'loopback_cifar10' is not prepared in {tmp_path}/loopback_cifar10/" in message
  assert f'and cannot be downloaded (http://127.0.0.1:{port}: Failed to establish a new connection: ' in message
  assert 'Connection refused' in message
  assert message.endswith(
    'offline, use a prepared tfds data_dir (--config.data.path=<data_dir>), '
    'or an image folder (--config.data.source=folder --config.data.path=<root>)'
  )
  assert '\n' not in message
  assert list(tmp_path.iterdir()) == []  # Nothing was downloaded or created.


def test_a_host_that_never_answers_is_given_up_after_the_timeout(monkeypatch):
  monkeypatch.setenv('no_proxy', '*')
  monkeypatch.setattr(tfds_source, 'PROBE_TIMEOUT_S', 1.0)
  with socket.socket() as silent:  # Accepts connections (the kernel's backlog), never answers.
    silent.bind(('127.0.0.1', 0))
    silent.listen()
    host = f'http://127.0.0.1:{silent.getsockname()[1]}'
    start = time.perf_counter()
    failure = tfds_source.unreachable([f'{host}/a.tar.gz', f'{host}/b.tar.gz'])
    assert time.perf_counter() - start < 3
  assert failure.startswith(f'{host}: ') and 'timed out' in failure


def test_one_answering_host_is_enough(server):
  _, base_url, requests_seen = server
  assert tfds_source.unreachable([f'{base_url}/missing.tar.gz', f'http://127.0.0.1:{closed_port()}/x']) is None
  assert tfds_source.unreachable(['gs://bucket/file', 'ftp://example.invalid/file']) is None  # Not asked.
  assert requests_seen == [('HEAD', '/missing.tar.gz')]  # A 404 is an answer: the host is online.


@pytest.mark.parametrize(
  'name, archive', [('cifar10', 'cifar-10-python.tar.gz'), ('cifar100', 'cifar-100-python.tar.gz')]
)
def test_without_download_an_empty_data_dir_fails_at_once_naming_the_offline_options(tmp_path, name, archive):
  start = time.perf_counter()
  with pytest.raises(DataError) as error:
    tfds_source.load(data_config(tmp_path, name, download=False))
  assert time.perf_counter() - start < 30
  message = str(error.value)
  assert f"tfds dataset '{name}' is not prepared in {tmp_path}/{name}/" in message
  assert 'and data.download=False: use a prepared tfds data_dir (--config.data.path=<data_dir>)' in message
  assert f'(--config.data.source=cifar_archive --config.data.path=<{archive}>)' in message
  assert message.endswith('or set --config.data.download=True online')
  assert '\n' not in message
  assert list(tmp_path.iterdir()) == []  # Nothing was downloaded or created.


def test_an_unknown_dataset_name_is_a_data_error(tmp_path):
  with pytest.raises(DataError, match=r"tfds has no dataset 'no_such_dataset' \(tried tfds.builder"):
    tfds_source.load(data_config(tmp_path, 'no_such_dataset'))


def test_reads_a_prepared_dataset_fully_with_its_validation_split(tmp_path):
  splits = {'train': tiny_examples(7, seed=0), 'validation': tiny_examples(2, seed=2), 'test': tiny_examples(4, seed=1)}
  prepare_tiny_dataset(tmp_path, splits)
  loaded = tfds_source.load(data_config(tmp_path, 'tiny_images'))
  assert set(loaded) == {'train', 'validation', 'test'}
  for split, examples in splits.items():
    assert loaded[split].class_names == TINY_CLASSES
    assert loaded[split].images.dtype == np.uint8 and loaded[split].labels.dtype == np.int32
    np.testing.assert_array_equal(loaded[split].images, np.stack([e['image'] for e in examples]))
    np.testing.assert_array_equal(loaded[split].labels, [e['label'] for e in examples])


def test_a_dataset_without_a_test_split_is_a_data_error(tmp_path):
  prepare_tiny_dataset(tmp_path, {'train': tiny_examples(3, seed=0)})
  with pytest.raises(DataError, match=r"tfds dataset 'tiny_images' has no test split \(it has \['train'\]\)"):
    tfds_source.load(data_config(tmp_path, 'tiny_images'))


@pytest.fixture(scope='module')
def varying_sizes(tmp_path_factory) -> tuple[Path, dict[str, list[dict]]]:
  """A prepared dataset of images of four sizes, landscape and portrait, like tf_flowers."""
  data_dir = tmp_path_factory.mktemp('varying')
  sizes = ((6, 9), (11, 7), (5, 5), (16, 12))
  splits = {'train': tiny_examples(5, seed=0, sizes=sizes), 'test': tiny_examples(3, seed=1, sizes=sizes[::-1])}
  prepare_tiny_dataset(data_dir, splits, shape=(None, None, 3))
  return data_dir, splits


@pytest.mark.parametrize('policy', images.RESIZE_POLICIES)
def test_varying_sizes_are_resized_by_load_image(varying_sizes, policy):
  data_dir, splits = varying_sizes
  loaded = tfds_source.load(data_config(data_dir, 'tiny_images', image_size=8, resize=policy))
  for split, examples in splits.items():
    expected = [images.to_model_input(e['image'], (8, 8), policy) for e in examples]  # As PNG: lossless.
    assert loaded[split].images.shape == (len(examples), 8, 8, 3)
    np.testing.assert_array_equal(loaded[split].images, np.stack(expected))
    np.testing.assert_array_equal(loaded[split].labels, [e['label'] for e in examples])


def test_varying_sizes_without_an_image_size_ask_for_one(varying_sizes):
  with pytest.raises(DataError) as error:
    tfds_source.load(data_config(varying_sizes[0], 'tiny_images'))
  message = str(error.value)
  assert message.startswith("tfds dataset 'tiny_images' has images of varying size (None, None, 3): ")
  assert 'set --config.data.image_size=N' in message and '\n' not in message


def test_one_size_at_another_image_size_is_resized_by_load_image(tmp_path):
  splits = {'train': tiny_examples(3, seed=0), 'test': tiny_examples(2, seed=1)}
  prepare_tiny_dataset(tmp_path, splits)
  loaded = tfds_source.load(data_config(tmp_path, 'tiny_images', image_size=6, resize='squash'))
  expected = [images.to_model_input(e['image'], (6, 6), 'squash') for e in splits['test']]
  np.testing.assert_array_equal(loaded['test'].images, np.stack(expected))


def test_only_loading_from_tfds_imports_tensorflow():
  code = (
    'import sys\n'
    'from resnet_flax.data import cifar_archive, folder, synthetic, tfds_source\n'
    "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets')))"
  )
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
  assert out.strip() == '[]'
