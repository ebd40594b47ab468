"""CIFAR-10-C corruptions: determinism, independence of the batch, growth with severity, faithfulness to
make_cifar_c.py, the cache, and the report of `--mode=evaluate --config.eval.corruptions`.

Images: 50 real CIFAR-10 test images (the first 5 of each class) taken from
../shared/data/cifar10-jpeg.tar.gz when it is there, else 50 deterministic synthetic ones (smooth
colour waves, an object, grain). Every corruption compiles once per image size and calls of 256
images, which the tests share.
"""

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from configs import smoke
from resnet_flax import data, evaluate
from resnet_flax.data import DataError
from resnet_flax.errors import ConfigError
from resnet_flax.robust import corruption_cache, corruption_ops, corruptions
from resnet_flax.train import config_checks

from helpers import indexed_report_dir

SHARED_ARCHIVE = Path(__file__).resolve().parents[1].parent / 'shared' / 'data' / 'cifar10-jpeg.tar.gz'
NAMES = list(corruption_ops.CORRUPTIONS)
# Corruptions whose output does not depend on the key (no random draw).
DETERMINISTIC = {'defocus_blur', 'zoom_blur', 'brightness', 'contrast', 'pixelate', 'jpeg_compression'}
# Their mean pixel change does not grow with severity in the original either (corruption_ops' docstring).
NOT_GROWING = {'glass_blur', 'motion_blur', 'frost', 'elastic_transform'}

# Mean absolute pixel change per severity of make_cifar_c.py's own functions (hendrycks/robustness, run
# with scikit-image 0.26, OpenCV 5.0, scipy 1.17, numpy seed 0; `multichannel` spelled `channel_axis`) on
# the first 20 test images of each class of the real data. Not motion_blur and snow (ImageMagick).
ORIGINAL_CHANGE = {
  'gaussian_noise': (7.963, 11.869, 15.682, 17.588, 19.418),
  'shot_noise': (5.912, 8.313, 13.013, 14.970, 18.210),
  'impulse_noise': (1.318, 2.550, 3.782, 6.319, 8.916),
  'defocus_blur': (1.387, 3.372, 5.091, 6.640, 9.470),
  'glass_blur': (11.606, 11.738, 11.410, 18.642, 17.930),
  'zoom_blur': (9.081, 10.632, 12.656, 14.729, 16.717),
  'frost': (31.054, 43.818, 49.473, 44.743, 43.628),
  'fog': (10.762, 21.149, 27.696, 33.429, 39.579),
  'brightness': (9.928, 20.091, 29.818, 39.021, 55.447),
  'contrast': (10.914, 21.819, 26.183, 30.545, 37.090),
  'elastic_transform': (22.734, 20.285, 18.047, 16.299, 13.910),
  'pixelate': (2.006, 3.446, 4.409, 6.448, 8.778),
  'jpeg_compression': (1.949, 3.515, 5.167, 7.042, 7.321),
}


def real_test_images(tmp_path: Path, per_class: int) -> np.ndarray | None:
  """The first `per_class` test images of each class of the real CIFAR-10 JPEGs, or None without them."""
  if not SHARED_ARCHIVE.is_file():
    return None
  names = [f'cifar10-jpeg/test/*/{i:04d}.jpg' for i in range(per_class)]
  subprocess.run(['tar', 'xzf', str(SHARED_ARCHIVE), '-C', str(tmp_path), '--wildcards', *names], check=True)
  files = sorted((tmp_path / 'cifar10-jpeg' / 'test').glob('*/*.jpg'), key=lambda p: (p.parent.name, p.name))
  return np.stack([np.asarray(Image.open(f).convert('RGB')) for f in files])


def synthetic_images(count: int, size: int = 32, seed: int = 0) -> np.ndarray:
  """Natural-looking stand-ins: smooth colour waves of varied brightness and contrast, a disc, grain."""
  rng = np.random.default_rng(seed)
  rows, cols = np.mgrid[:size, :size] / size
  images = []
  for _ in range(count):
    image = np.zeros((size, size, 3))
    for _ in range(3):
      fy, fx, phase = rng.uniform(0.5, 3), rng.uniform(0.5, 3), rng.uniform(0, 2 * np.pi)
      image += rng.uniform(0, 1, 3) * np.sin(2 * np.pi * (fy * rows + fx * cols) + phase)[..., None]
    image = (image - image.min()) / np.ptp(image) * rng.uniform(120, 230) + rng.uniform(0, 25)
    cy, cx, radius = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
    image[(rows - cy) ** 2 + (cols - cx) ** 2 < radius**2] = rng.uniform(0, 255, 3)
    images.append(np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8))
  return np.stack(images)


@pytest.fixture(scope='module')
def images(tmp_path_factory) -> np.ndarray:
  real = real_test_images(tmp_path_factory.mktemp('cifar'), per_class=5)
  return synthetic_images(50) if real is None else real


def mean_change(corrupted: np.ndarray, clean: np.ndarray) -> float:
  return float(np.abs(corrupted.astype(np.float64) - clean).mean())


@pytest.mark.parametrize('name', NAMES)
def test_the_same_seed_gives_bitwise_the_same_images_and_another_seed_others(images, name):
  first, again = (
    corruption_ops.corrupt(images[:8], name, 3, seed=0),
    corruption_ops.corrupt(images[:8], name, 3, seed=0),
  )
  np.testing.assert_array_equal(first, again)
  other_seed = corruption_ops.corrupt(images[:8], name, 3, seed=1)
  assert np.array_equal(first, other_seed) == (name in DETERMINISTIC)
  assert first.dtype == np.uint8 and first.shape == images[:8].shape
  assert not np.array_equal(first, images[:8])


@pytest.mark.parametrize('name', sorted(set(NAMES) - DETERMINISTIC))
def test_an_images_corruption_does_not_depend_on_its_batch(images, name):
  """Image 40 alone, in a batch of 50 and at position 290 of 300 (the second call) is corrupted alike."""
  alone = corruption_ops.corrupt(images[40:41], name, 4, seed=3, indices=[40])
  in_batch = corruption_ops.corrupt(images, name, 4, seed=3)[40]
  many = np.concatenate([images[:40], np.repeat(images[:1], 250, axis=0), images[40:]])
  far = corruption_ops.corrupt(many, name, 4, seed=3, indices=np.r_[:40, 1000:1250, 40:50])[290]
  np.testing.assert_array_equal(alone[0], in_batch)
  np.testing.assert_array_equal(alone[0], far)
  other_index = corruption_ops.corrupt(images[40:41], name, 4, seed=3, indices=[41])
  assert not np.array_equal(alone, other_index)


@pytest.mark.parametrize('name', NAMES)
def test_the_pixel_change_grows_with_severity_as_in_the_original(images, name):
  change = [mean_change(corruption_ops.corrupt(images, name, s), images) for s in corruption_ops.SEVERITIES]
  if name not in NOT_GROWING:
    assert all(b > a for a, b in zip(change, change[1:], strict=False)), change
  elif name == 'glass_blur':  # Two shuffling passes (4, 5) move more than one (1-3), whose blur varies.
    assert min(change[3:]) > max(change[:3]), change
  elif name == 'motion_blur':  # Severities 3 and 4 have the same kernel (sigma 2; radius 6 or 8 adds ~1e-4).
    assert change[0] < change[1] < change[2] and change[3] < change[4], change
    assert abs(change[3] - change[2]) < 0.05 * change[2], change
  elif name == 'frost':  # Image weights 1, 1, 0.9, 0.85, 0.75 with frost 0.2, 0.3, 0.4, 0.4, 0.45.
    assert change[0] < change[1] < change[2] and max(change[3:]) < change[2], change
  else:  # elastic_transform: severity 1 is the strongest affine warp, 5 the weakest.
    assert all(b < a for a, b in zip(change, change[1:], strict=False)), change


@pytest.fixture(scope='module')
def more_real_images(tmp_path_factory) -> np.ndarray:
  real = real_test_images(tmp_path_factory.mktemp('cifar'), per_class=20)
  if real is None:
    pytest.skip('the real CIFAR-10 JPEGs (../shared/data/cifar10-jpeg.tar.gz) are not here')
  return real


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(ORIGINAL_CHANGE))
def test_the_pixel_change_is_the_originals_on_the_same_real_images(name, more_real_images):
  real = more_real_images
  change = [mean_change(corruption_ops.corrupt(real, name, s), real) for s in corruption_ops.SEVERITIES]
  np.testing.assert_allclose(change, ORIGINAL_CHANGE[name], rtol=0.06)


@pytest.mark.parametrize('name', ['fog', 'zoom_blur', 'pixelate'])
def test_any_square_size_runs(name):
  """24 px: not a power of two (fog's fractal is cropped) and not CIFAR's 32."""
  clean = synthetic_images(3, size=24)
  corrupted = corruption_ops.corrupt(clean, name, 5)
  assert corrupted.dtype == np.uint8 and corrupted.shape == clean.shape and mean_change(corrupted, clean) > 1


def test_images_that_are_not_square_rgb_uint8_are_refused(images):
  for bad in (images[:2, :, :30], images[:2, ..., :1], images[:2].astype(np.float32)):
    with pytest.raises(DataError, match=r'uint8 \[N, S, S, 3\]'):
      corruption_ops.corrupt(bad, 'fog', 1)


def test_the_cache_returns_the_same_images_without_making_them_again(images, tmp_path, monkeypatch):
  made = corruption_cache.load_or_corrupt(images[:4], 'gaussian_noise', 2, seed=0, cache_dir=str(tmp_path))
  [path] = tmp_path.glob('gaussian_noise-2-*.npy')
  monkeypatch.setattr(corruption_ops, 'corrupt', lambda *args: pytest.fail('made again instead of read'))
  np.testing.assert_array_equal(
    corruption_cache.load_or_corrupt(images[:4], 'gaussian_noise', 2, 0, str(tmp_path)), made
  )
  monkeypatch.undo()
  for changed in ({'seed': 1}, {'severity': 3}, {'indices': [1, 2, 3, 4]}):  # Each is a new file.
    arguments = {'images': images[:4], 'name': 'gaussian_noise', 'severity': 2, 'seed': 0, **changed}
    corruption_cache.load_or_corrupt(**arguments, cache_dir=str(tmp_path))
  assert len(list(tmp_path.glob('*.npy'))) == 4 and not list(tmp_path.glob('*.tmp'))
  path.write_bytes(b'not an array')  # A broken file is made again.
  np.testing.assert_array_equal(
    corruption_cache.load_or_corrupt(images[:4], 'gaussian_noise', 2, 0, str(tmp_path)), made
  )
  np.testing.assert_array_equal(np.load(path), made)
  blocked = tmp_path / 'a_file'
  blocked.write_text('')  # Not a folder: made, not cached.
  np.testing.assert_array_equal(
    corruption_cache.load_or_corrupt(images[:4], 'gaussian_noise', 2, 0, str(blocked)), made
  )


def test_examples_are_class_stratified_seeded_and_a_smaller_number_is_a_subset():
  labels = np.repeat(np.arange(10), 100)[np.random.default_rng(5).permutation(1000)]
  chosen = data.stratified_subset(labels, 100, seed=0)
  assert np.all(np.diff(chosen) > 0) and np.all(np.bincount(labels[chosen], minlength=10) == 10)
  assert set(data.stratified_subset(labels, 30, seed=0)) < set(chosen)
  assert set(data.stratified_subset(labels, 100, seed=1)) != set(chosen)
  np.testing.assert_array_equal(data.stratified_subset(labels, 0, seed=0), np.arange(1000))


def test_ce_and_mce_follow_hendrycks():
  accuracy = {'fog': [0.9, 0.8, 0.7, 0.6, 0.5], 'snow': [0.8] * 5}
  baseline = {'path': 'b', 'clean_accuracy': 0.9, 'accuracy': {'fog': [0.8] * 5, 'snow': [0.9] * 5}}
  scores = corruptions.scores(accuracy, 0.95, baseline)
  assert scores['mean_accuracy'] == pytest.approx(0.75)
  assert scores['errors'] == pytest.approx({'fog': 0.3, 'snow': 0.2})
  assert scores['ce'] == pytest.approx({'fog': 1.5 / 1.0, 'snow': 1.0 / 0.5})
  assert scores['mce'] == pytest.approx(1.75)
  # Relative: errors minus the clean error; the baseline's snow errors equal its clean error: undefined.
  assert scores['relative_ce'] == {'fog': pytest.approx((1.5 - 5 * 0.05) / (1.0 - 5 * 0.1)), 'snow': None}
  assert scores['relative_mce'] is None


def test_config_rules_name_the_corruptions():
  config = smoke.get_config()
  for value in ('', 'all', 'fog, snow', 'jpeg_compression'):
    config.eval.corruptions = value
    config_checks.validate(config)
  config.eval.corruptions = 'fog,mist'
  with pytest.raises(ConfigError, match=r"eval.corruptions='fog,mist' is invalid: unknown corruptions \['mist'\]"):
    config_checks.validate(config)
  config.eval.corruptions = 'fog'
  for field in ('corruption_examples', 'corruption_seed'):
    config.eval[field] = -1
    with pytest.raises(ConfigError, match=f'eval.{field}=-1 is invalid: must be a whole number'):
      config_checks.validate(config)
    config.eval[field] = 0


# The report of --mode=evaluate, on a copy of the shared smoke run (evaluating writes into its workdir).

EVAL_CORRUPTIONS = 'brightness,fog'  # The smoke run errs on both (it is robust to most others).


def corruption_config(cache_dir, **fields):
  config = smoke.get_config()
  config.eval.update(corruptions=EVAL_CORRUPTIONS, corruption_examples=40, corruption_cache_dir=str(cache_dir))
  config.eval.update(fields)
  return config


@pytest.fixture(scope='module')
def scored_run(straight_run, tmp_path_factory):
  """A trained workdir, its report with corruptions, and the cache directory."""
  workdir, cache = tmp_path_factory.mktemp('scored') / 'run', tmp_path_factory.mktemp('cache')
  shutil.copytree(straight_run, workdir)
  return workdir, evaluate.evaluate_checkpoint(corruption_config(cache), str(workdir)), cache


def test_evaluation_reports_accuracy_per_corruption_and_severity(scored_run):
  workdir, report, _ = scored_run
  entry = report['corruptions']
  assert entry['examples'] == 40 and entry['seed'] == 0 and entry['generator_version'] > 0
  assert list(entry['accuracy']) == ['brightness', 'fog'] and all(len(a) == 5 for a in entry['accuracy'].values())
  accuracies = [a for values in entry['accuracy'].values() for a in values]
  assert all(a * 40 == round(a * 40) for a in [*accuracies, entry['clean_accuracy']])  # Fractions of 40 images.
  assert entry['mean_accuracy'] == pytest.approx(np.mean(accuracies))
  assert entry['errors']['fog'] == pytest.approx(1 - np.mean(entry['accuracy']['fog']))
  assert 'mce' not in entry
  directory = indexed_report_dir(workdir, smoke.get_config().data, 'c-brightness+fog')
  assert (directory / 'corruptions.png').read_bytes()[:4] == b'\x89PNG'
  assert '"corruptions"' in (directory / 'report.json').read_text()


def test_a_workdir_is_found_as_the_baseline_and_other_images_are_refused(scored_run):
  workdir, report, cache = scored_run
  against_itself = evaluate.evaluate_checkpoint(
    corruption_config(cache, corruption_baseline=str(workdir)), str(workdir)
  )
  entry = against_itself['corruptions']
  assert entry['accuracy'] == report['corruptions']['accuracy']  # Read from the cache, scored alike.
  assert entry['baseline'].endswith('report.json')
  refusals = {
    'scored on other corrupted images .*examples 40 here 30': {'corruption_examples': 30},
    'scored on other corrupted images .*seed 0 here 1': {'corruption_seed': 1},
    r"lacks the corruptions \['snow'\]": {'corruptions': 'fog,snow'},
  }
  for message, fields in refusals.items():
    with pytest.raises(ConfigError, match=f'{message}.*--config.eval.corruptions=all'):
      evaluate.evaluate_checkpoint(corruption_config(cache, corruption_baseline=str(workdir), **fields), str(workdir))


# A baseline's report with known errors: brightness 0.1 to 0.5 (sum 1.5), fog 0.5 at every severity (sum 2.5).
BASELINE_ACCURACY = {'brightness': [0.9, 0.8, 0.7, 0.6, 0.5], 'fog': [0.5] * 5}
BASELINE_ERROR_SUMS, BASELINE_CLEAN_ERROR = {'brightness': 1.5, 'fog': 2.5}, 0.05


def test_the_mce_divides_the_errors_by_the_baselines(scored_run, tmp_path):
  workdir, report, cache = scored_run
  ours = report['corruptions']
  identity = {key: ours[key] for key in ('examples', 'seed', 'generator_version', 'images_sha256')}
  baseline = tmp_path / 'report.json'
  scripted = {**identity, 'clean_accuracy': 1 - BASELINE_CLEAN_ERROR, 'accuracy': BASELINE_ACCURACY}
  baseline.write_text(json.dumps({'corruptions': scripted}))
  entry = evaluate.evaluate_checkpoint(corruption_config(cache, corruption_baseline=str(baseline)), str(workdir))
  entry = entry['corruptions']
  assert entry['baseline'] == str(baseline) and entry['accuracy'] == ours['accuracy']
  error_sums = {name: sum(1 - a for a in accuracy) for name, accuracy in ours['accuracy'].items()}
  ce = {name: error_sums[name] / BASELINE_ERROR_SUMS[name] for name in BASELINE_ERROR_SUMS}
  assert entry['ce'] == pytest.approx(ce) and entry['mce'] == pytest.approx(np.mean(list(ce.values())))
  assert ce != pytest.approx({'brightness': 1.0, 'fog': 1.0})  # So the baseline is not this run's own errors.
  excess = lambda sum_of_errors, clean_error: sum_of_errors - 5 * clean_error  # Over its five severities.
  relative = {
    name: excess(error_sums[name], 1 - ours['clean_accuracy']) / excess(BASELINE_ERROR_SUMS[name], BASELINE_CLEAN_ERROR)
    for name in BASELINE_ERROR_SUMS
  }
  assert entry['relative_ce'] == pytest.approx(relative)
  assert entry['relative_mce'] == pytest.approx(np.mean(list(relative.values())))


def test_a_baseline_never_scored_on_corruptions_is_refused(scored_run, tmp_path):
  workdir, _, cache = scored_run
  looked = f'looked for a report of brightness, fog on synthetic-test-.* in {re.escape(str(tmp_path))}'
  with pytest.raises(ConfigError, match=f'{looked}.*found none; evaluate it with'):
    evaluate.evaluate_checkpoint(corruption_config(cache, corruption_baseline=str(tmp_path)), str(workdir))
