"""Image-folder source: labels, pixels, errors and the decoded-array cache."""

import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from configs import default
from resnet_flax.data import DataError, folder, images

CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')


def data_config(path, cache_dir=''):
  config = default.get_config().data
  config.source, config.path, config.cache_dir = 'folder', str(path), str(cache_dir)
  return config


def write_image(path: Path, pixels: np.ndarray) -> np.ndarray:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(pixels).save(path)
  return pixels


def random_pixels(rng, size=(8, 8)) -> np.ndarray:
  return rng.integers(0, 256, (*size, 3), dtype=np.uint8)


def make_folder(root: Path, classes: dict[str, dict[str, int]], seed: int = 0) -> dict[str, np.ndarray]:
  """Writes `classes[split][class]` random 8x8 PNGs per class; returns their pixels by path."""
  rng = np.random.default_rng(seed)
  return {
    str(path): write_image(path, random_pixels(rng))
    for split, counts in classes.items()
    for name, count in counts.items()
    for path in [root / split / name / f'{i:03d}.png' for i in range(count)]
  }


@pytest.fixture
def small_folder(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
  root = tmp_path / 'images'
  pixels = make_folder(root, {'train': {'zebra': 3, 'ant': 2, 'moth': 4}, 'test': {'moth': 2, 'ant': 1}})
  return root, pixels


@pytest.fixture
def decode_calls(monkeypatch) -> list[int]:
  """Records how many images each call of `folder.decode_images` decodes."""
  calls, decode_images = [], folder.decode_images

  def counting(paths, decoding, into=None):
    calls.append(len(paths))
    return decode_images(paths, decoding, into)

  monkeypatch.setattr(folder, 'decode_images', counting)
  return calls


def expected_split(root: Path, split: str, pixels: dict[str, np.ndarray], class_names) -> tuple:
  """Images and labels in class-then-file-name order, built without the code under test."""
  paths = [
    str(root / split / name / file)
    for name in class_names
    if (root / split / name).is_dir()
    for file in sorted(os.listdir(root / split / name))
  ]
  return np.stack([pixels[p] for p in paths]), np.array([class_names.index(Path(p).parent.name) for p in paths])


def test_classes_are_sorted_and_labels_and_pixels_follow_them(small_folder):
  root, pixels = small_folder
  splits = folder.load(data_config(root))
  assert set(splits) == {'train', 'test'}
  for split in ('train', 'test'):
    assert splits[split].class_names == ('ant', 'moth', 'zebra')
    images, labels = expected_split(root, split, pixels, ('ant', 'moth', 'zebra'))
    np.testing.assert_array_equal(splits[split].images, images)
    np.testing.assert_array_equal(splits[split].labels, labels)
    assert splits[split].labels.dtype == np.int32 and splits[split].images.dtype == np.uint8
  assert splits['test'].labels.tolist() == [0, 1, 1]  # 'zebra' is absent from test: labels stay train's.


def test_jpeg_grey_and_any_case_extensions_equal_a_pillow_decode(tmp_path):
  rng = np.random.default_rng(1)
  files = {'train/a/x.jpg': 'RGB', 'train/a/y.JPEG': 'RGB', 'train/b/z.Png': 'L', 'test/b/w.jpeg': 'RGB'}
  for name, mode in files.items():
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(random_pixels(rng)).convert(mode).save(path, format='PNG' if mode == 'L' else 'JPEG')
  (tmp_path / 'train/a/notes.txt').write_text('not an image')
  (tmp_path / 'train/a/._x.jpg').write_bytes(b'macOS metadata, not an image')
  splits = folder.load(data_config(tmp_path))
  for split, names in (('train', ['train/a/x.jpg', 'train/a/y.JPEG', 'train/b/z.Png']), ('test', ['test/b/w.jpeg'])):
    decoded = np.stack([np.asarray(Image.open(tmp_path / name).convert('RGB')) for name in names])
    np.testing.assert_array_equal(splits[split].images, decoded)
  assert splits['train'].labels.tolist() == [0, 0, 1] and splits['test'].labels.tolist() == [1]


def empty_the_test_split(root: Path):
  shutil.rmtree(root / 'test')
  (root / 'test').mkdir()


def truncate(path: Path):
  path.write_bytes(path.read_bytes()[:60])


@pytest.mark.parametrize(
  'break_folder, message',
  [
    (lambda root: os.rename(root / 'test', root / 'val'), '{root}/test does not exist'),
    (empty_the_test_split, '{root}/test has no class subdirectories'),
    (lambda root: (root / 'train' / 'empty').mkdir(), '{root}/train/empty has no images (.jpg/'),
    (
      lambda root: write_image(root / 'test' / 'wasp' / 'a.png', np.zeros((8, 8, 3), np.uint8)),
      "{root}/test has classes ['wasp'] that {root}/train lacks",
    ),
    (
      lambda root: write_image(root / 'train' / 'moth' / 'big.png', np.zeros((30, 40, 3), np.uint8)),
      '{root}/train/moth/big.png is 40x30 pixels but {root}/train/ant/000.png is 8x8',
    ),
    (
      lambda root: write_image(root / 'test' / 'ant' / 'wide.png', np.zeros((8, 9, 3), np.uint8)),
      '{root}/test/ant/wide.png is 9x8 pixels but {root}/train/ant/000.png is 8x8',
    ),
    (
      lambda root: (root / 'train' / 'ant' / 'broken.jpg').write_bytes(b'\xff\xd8 not really a JPEG'),
      'cannot decode {root}/train/ant/broken.jpg',
    ),
    (lambda root: truncate(root / 'test' / 'moth' / '001.png'), 'cannot decode {root}/test/moth/001.png'),
  ],
)
def test_errors_name_the_problem_in_one_line(small_folder, break_folder, message):
  root, _ = small_folder
  break_folder(root)
  with pytest.raises(DataError) as error:
    folder.load(data_config(root))
  assert message.format(root=root) in str(error.value)
  assert '\n' not in str(error.value)


def test_missing_or_empty_path_says_what_to_set(tmp_path):
  with pytest.raises(DataError, match=r'data.path is empty: set --config.data.path=<root>'):
    folder.load(data_config(''))
  with pytest.raises(DataError, match=f'data.path {tmp_path}/missing is not a directory: point --config.data.path'):
    folder.load(data_config(tmp_path / 'missing'))


def test_second_load_comes_from_the_cache(small_folder, decode_calls, monkeypatch):
  root, _ = small_folder
  first = folder.load(data_config(root))
  assert decode_calls == [9, 3]
  assert sorted(p.name.split('-')[0] for p in (root / '.resnet_flax_cache').iterdir()) == ['test', 'train']
  monkeypatch.setattr(folder, 'decode_images', lambda *args: pytest.fail('decoded instead of using the cache'))
  second = folder.load(data_config(root))
  for split in ('train', 'test'):
    np.testing.assert_array_equal(second[split].images, first[split].images)
    np.testing.assert_array_equal(second[split].labels, first[split].labels)
    assert second[split].class_names == first[split].class_names


def test_cache_invalidates_when_a_file_is_touched_changed_or_added(small_folder, decode_calls):
  root, _ = small_folder
  folder.load(data_config(root))
  changed = root / 'train' / 'moth' / '002.png'
  os.utime(changed, ns=(1, 1))  # Same content, new mtime: decoded again (no file is read for the key).
  folder.load(data_config(root))
  assert decode_calls == [9, 3, 9]  # train decoded again, test still cached.
  write_image(changed, np.full((8, 8, 3), 7, np.uint8))
  os.utime(changed, ns=(2, 2))  # A rewrite within the clock's resolution could keep the mtime.
  splits = folder.load(data_config(root))
  assert decode_calls == [9, 3, 9, 9]
  np.testing.assert_array_equal(splits['train'].images[4], np.full((8, 8, 3), 7, np.uint8))
  write_image(root / 'test' / 'zebra' / 'new.png', np.zeros((8, 8, 3), np.uint8))
  splits = folder.load(data_config(root))
  assert decode_calls == [9, 3, 9, 9, 4]
  assert splits['test'].labels.tolist() == [0, 1, 1, 2]


def test_a_new_train_class_invalidates_the_test_cache(small_folder, decode_calls):
  root, _ = small_folder
  folder.load(data_config(root))
  write_image(root / 'train' / 'aardvark' / 'a.png', np.zeros((8, 8, 3), np.uint8))  # Shifts every label.
  splits = folder.load(data_config(root))
  assert decode_calls == [9, 3, 10, 3]
  assert splits['test'].labels.tolist() == [1, 2, 2]


def test_a_corrupt_cache_is_ignored_and_rebuilt(small_folder, decode_calls, caplog):
  root, _ = small_folder
  first_images = np.array(folder.load(data_config(root))['train'].images)  # A copy: the file is mapped.
  for cache in (root / '.resnet_flax_cache').iterdir():
    cache.write_bytes(cache.read_bytes()[:300])  # A torn write, as if the file had been truncated.
  with caplog.at_level(logging.WARNING):
    second = folder.load(data_config(root))
  assert 'ignoring unreadable cache' in caplog.text
  assert decode_calls == [9, 3, 9, 3]
  np.testing.assert_array_equal(second['train'].images, first_images)
  folder.load(data_config(root))
  assert decode_calls == [9, 3, 9, 3]


def test_a_failed_cache_write_leaves_no_file_behind(small_folder, monkeypatch):
  root, _ = small_folder
  load_image, calls = images.load_image, []

  def interrupted_load(*args):
    calls.append(args)
    if len(calls) == 5:
      raise KeyboardInterrupt  # As if the run were interrupted halfway through the decoding.
    return load_image(*args)

  monkeypatch.setattr(images, 'load_image', interrupted_load)
  with pytest.raises(KeyboardInterrupt):
    folder.load(data_config(root))
  assert list((root / '.resnet_flax_cache').iterdir()) == []


def test_cache_dir_and_fallbacks(small_folder, tmp_path, monkeypatch, caplog):
  root, _ = small_folder
  folder.load(data_config(root, cache_dir=tmp_path / 'my_cache'))
  assert len(list((tmp_path / 'my_cache').glob('*.npy'))) == 2 and not (root / '.resnet_flax_cache').exists()

  (root / '.resnet_flax_cache').write_text('a file where the cache directory would go: not writable')
  monkeypatch.setattr(Path, 'home', lambda: tmp_path / 'home')
  folder.load(data_config(root))
  assert len(list((tmp_path / 'home' / '.cache' / 'resnet_flax').glob('*.npy'))) == 2

  with caplog.at_level(logging.WARNING):
    splits = folder.load(data_config(root, cache_dir=root / '.resnet_flax_cache' / 'below_a_file'))
  assert 'no cache directory among' in caplog.text and len(splits['train']) == 9


@pytest.mark.slow
def test_real_cifar10_jpeg_folder(cifar10_jpeg_dir, tmp_path):
  config = data_config(cifar10_jpeg_dir, cache_dir=tmp_path / 'cache')
  start = time.perf_counter()
  first = folder.load(config)
  first_seconds = time.perf_counter() - start
  start = time.perf_counter()
  second = folder.load(config)
  second_seconds = time.perf_counter() - start
  assert first_seconds >= 10 * second_seconds, (first_seconds, second_seconds)

  train, test = first['train'], first['test']
  assert (len(train), len(test)) == (50_000, 10_000)
  assert train.class_names == test.class_names == CIFAR10_CLASSES
  assert np.bincount(train.labels).tolist() == [5000] * 10
  assert np.bincount(test.labels).tolist() == [1000] * 10
  np.testing.assert_array_equal(second['train'].images, train.images)
  np.testing.assert_array_equal(second['test'].labels, test.labels)

  train_dir = cifar10_jpeg_dir / 'train'
  paths = [train_dir / name / file for name in CIFAR10_CLASSES for file in sorted(os.listdir(train_dir / name))]
  for i in np.random.default_rng(0).choice(len(paths), 50, replace=False):
    np.testing.assert_array_equal(train.images[i], np.asarray(Image.open(paths[i]).convert('RGB')))
    assert train.labels[i] == CIFAR10_CLASSES.index(paths[i].parent.name)


def save_as(path: Path, image: Image.Image, **options) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  image.save(path, **options)


def test_any_format_and_mode_becomes_rgb_and_exif_orientation_is_applied(tmp_path):
  rng = np.random.default_rng(0)
  rgb = Image.fromarray(random_pixels(rng, (8, 8)))
  rgba = Image.fromarray(np.dstack([random_pixels(rng, (8, 8)), np.full((8, 8), 255, np.uint8)]))
  turned = Image.fromarray(random_pixels(rng, (8, 8)))  # Stored as is; EXIF says turn it a quarter.
  exif = Image.Exif()
  exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display.
  save_as(tmp_path / 'train/a/0.WEBP', rgb, lossless=True)
  save_as(tmp_path / 'train/a/1.bmp', rgb.convert('L'))
  save_as(tmp_path / 'train/a/2.Gif', rgb.convert('P'))
  save_as(tmp_path / 'train/a/3.tiff', rgb.convert('CMYK'))
  save_as(tmp_path / 'train/b/4.png', rgba)
  save_as(tmp_path / 'train/b/5.png', Image.fromarray(np.asarray(rgb.convert('L'), np.uint16) * 257))  # 16-bit.
  save_as(tmp_path / 'train/b/6.png', turned, exif=exif)
  save_as(tmp_path / 'test/a/7.jpeg', rgb)
  train = folder.load(data_config(tmp_path))['train']
  grey = np.asarray(rgb.convert('L'))
  expected = [
    np.asarray(rgb),
    np.stack([grey] * 3, -1),
    np.asarray(rgb.convert('P').convert('RGB')),
    np.asarray(rgb.convert('CMYK').convert('RGB')),
    np.asarray(rgba)[..., :3],  # Opaque: compositing changes nothing.
    np.stack([grey] * 3, -1),
    np.asarray(turned.transpose(Image.Transpose.ROTATE_270)),
  ]
  assert train.images.shape == (7, 8, 8, 3)
  for i, pixels in enumerate(expected):
    np.testing.assert_array_equal(train.images[i], pixels, err_msg=f'image {i}')


def test_transparent_pixels_become_white():
  pixels = np.zeros((4, 4, 4), np.uint8)  # Black and fully transparent.
  pixels[0, 0] = (10, 20, 30, 255)
  rgb = images.to_model_input(pixels, (4, 4), 'squash')
  assert rgb[0, 0].tolist() == [10, 20, 30] and (rgb.reshape(-1, 3)[1:] == 255).all()


@pytest.mark.parametrize('policy', images.RESIZE_POLICIES)
def test_image_size_resizes_every_image_at_decode_by_the_policy(tmp_path, decode_calls, policy):
  rng = np.random.default_rng(0)
  sizes = {'train/a/0.png': (40, 30), 'train/a/1.jpg': (17, 64), 'test/a/2.png': (8, 8)}
  originals = {name: Image.fromarray(random_pixels(rng, (h, w))) for name, (w, h) in sizes.items()}
  for name, image in originals.items():
    save_as(tmp_path / name, image)
  config = data_config(tmp_path)
  config.image_size, config.resize = 16, policy
  splits = folder.load(config)
  assert splits['train'].images.shape == (2, 16, 16, 3) and splits['test'].images.shape == (1, 16, 16, 3)
  decoded = Image.open(tmp_path / 'train/a/1.jpg').convert('RGB')
  if policy == 'squash':
    expected = decoded.resize((16, 16), images.RESAMPLING)
  else:  # Scale the shorter side (17) to 16, then the centre 16 rows of the 60.
    expected = decoded.resize((16, 60), images.RESAMPLING).crop((0, 22, 16, 38))
  assert np.abs(splits['train'].images[1].astype(int) - np.asarray(expected)).mean() < 3
  folder.load(config)
  config.image_size = 12  # Another size, or another policy, is another cache.
  folder.load(config)
  assert decode_calls == [2, 1, 2, 1]


def test_a_val_folder_is_the_validation_split(small_folder):
  root, _ = small_folder
  write_image(root / 'val' / 'moth' / 'v.png', np.zeros((8, 8, 3), np.uint8))
  splits = folder.load(data_config(root))
  assert sorted(splits) == ['test', 'train', 'validation']
  assert splits['validation'].labels.tolist() == [splits['train'].class_names.index('moth')]
  (root / 'validation').mkdir()
  with pytest.raises(DataError, match='has both val and validation/: keep one validation folder'):
    folder.load(data_config(root))
