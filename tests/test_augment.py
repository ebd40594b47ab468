"""On-device augmentation: exact op semantics, their statistics, keys, jit, sharding, no TensorFlow.

Op strings, `check_ops` and registering a new op: test_augment_registry.py."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from resnet_flax.data import augment

from helpers import xla_flags

ROOT = Path(__file__).resolve().parents[1]
SIDE = 8
# Identity normalization up to the 1/255 scale: `_pixels` recovers the exact uint8 values.
ZERO_MEAN, UNIT_STD = (0.0,) * 3, (1.0,) * 3


def _config(ops, **overrides):
  config = default.get_config().augment
  config.train_ops = tuple(ops)
  config.update(overrides)
  return config


def _unique_image() -> np.ndarray:
  """SIDE x SIDE x 3, every pixel different and none 0 (so constant padding is recognisable)."""
  base = np.arange(1, SIDE * SIDE + 1).reshape(SIDE, SIDE, 1)
  return (base + 64 * np.arange(3)).astype(np.uint8)


def _copies(image: np.ndarray, n: int) -> np.ndarray:
  return np.broadcast_to(image, (n, *image.shape)).copy()


def _augment(images, config, mean, std, key=0, epoch=0) -> np.ndarray:
  """augment_batch as the trainer runs it: under jit, with the config and statistics as constants."""
  augment_fn = jax.jit(lambda x, k, i, e: augment.augment_batch(x, k, config, mean, std, indices=i, epoch=e, seed=0))
  return np.asarray(augment_fn(images, jax.random.key(key), jnp.arange(len(images)), epoch))


def _pixels(images, ops, key=0, **overrides) -> np.ndarray:
  out = _augment(images, _config(ops, **overrides), ZERO_MEAN, UNIT_STD, key)
  return np.rint(out * 255).astype(np.int64)


def _binomial_ok(successes: int, n: int, p: float, sigmas: float = 5.0) -> bool:
  return abs(successes - n * p) <= sigmas * np.sqrt(n * p * (1 - p))


def test_normalize_maps_0_and_255_to_the_expected_extremes():
  mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
  images = np.zeros((2, 5, 4, 4, 3), np.uint8)
  images[:, :, :, 1] = 255
  out = augment.normalize(jnp.asarray(images), mean, std)
  assert out.dtype == jnp.float32 and out.shape == images.shape
  np.testing.assert_allclose(out[..., 0, :], np.broadcast_to(-np.array(mean) / std, (2, 5, 4, 3)), rtol=1e-6)
  np.testing.assert_allclose(out[..., 1, :], np.broadcast_to((1 - np.array(mean)) / std, (2, 5, 4, 3)), rtol=1e-6)


def test_augment_batch_shapes_dtypes_and_ranges():
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
  images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
  out = _augment(images, _config(('crop', 'flip', 'cutout')), mean, std)
  assert out.dtype == np.float32 and out.shape == images.shape
  low, high = -np.array(mean) / std, (1 - np.array(mean)) / std
  assert np.all(out >= low - 1e-5) and np.all(out <= high + 1e-5)


def test_no_ops_is_just_normalize():
  images = np.random.default_rng(1).integers(0, 256, (3, SIDE, SIDE, 3), dtype=np.uint8)
  out = augment.augment_batch(
    images, jax.random.key(0), _config(()), (0.5,) * 3, (0.2,) * 3, indices=jnp.arange(3), epoch=0, seed=0
  )
  np.testing.assert_array_equal(out, augment.normalize(images, (0.5,) * 3, (0.2,) * 3))


@pytest.mark.parametrize('pad_mode', ['reflect', 'constant'])
def test_crop_is_the_padded_slice_at_offsets_covering_0_to_2_padding(pad_mode):
  padding, n = 3, 1000
  image = _unique_image()
  crops = _pixels(_copies(image, n), ('crop',), crop_padding=padding, pad_mode=pad_mode)
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)), mode=pad_mode).astype(np.int64)
  span = range(2 * padding + 1)
  offsets = []
  for crop in crops:
    matches = [(y, x) for y in span for x in span if np.array_equal(crop, padded[y : y + SIDE, x : x + SIDE])]
    assert len(matches) == 1, f'crop is not a slice of the {pad_mode}-padded image'
    offsets.append(matches[0])
  assert set(offsets) == {(y, x) for y in span for x in span}
  for axis in range(2):
    counts = np.bincount([offset[axis] for offset in offsets], minlength=len(span))
    assert all(_binomial_ok(c, n, 1 / len(span)) for c in counts), counts


def test_flip_mirrors_exactly_and_at_rate_one_half():
  n, image = 4000, _unique_image()
  out = _pixels(_copies(image, n), ('flip',))
  flipped = np.all(out == image[:, ::-1], axis=(1, 2, 3))
  unchanged = np.all(out == image, axis=(1, 2, 3))
  assert np.all(flipped ^ unchanged)
  assert _binomial_ok(int(flipped.sum()), n, 0.5), flipped.sum()


def test_ops_draw_independent_keys():
  """Two flips with one shared key would always cancel out; independent ones leave half mirrored."""
  n, image = 1000, _unique_image()
  out = _pixels(_copies(image, n), ('flip', 'flip'))
  flipped = np.all(out == image[:, ::-1], axis=(1, 2, 3))
  assert _binomial_ok(int(flipped.sum()), n, 0.5), flipped.sum()


def test_appending_an_op_keeps_the_draws_of_the_earlier_ones():
  images = _copies(_unique_image(), 64)
  cropped = _pixels(images, ('crop',))
  cropped_flipped = _pixels(images, ('crop', 'flip'))
  same = np.all(cropped_flipped == cropped, axis=(1, 2, 3))
  mirrored = np.all(cropped_flipped == cropped[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(same | mirrored) and same.any() and mirrored.any()


def _erased_box(erased: np.ndarray) -> tuple[int, int, int, int]:
  """(top, bottom, left, right) of the erased pixels; asserts they form exactly that rectangle."""
  rows, cols = np.flatnonzero(erased.any(axis=1)), np.flatnonzero(erased.any(axis=0))
  top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
  box = np.zeros_like(erased)
  box[top:bottom, left:right] = True
  np.testing.assert_array_equal(erased, box)
  return top, bottom, left, right


def _centre(start: int, stop: int, size: int) -> int:
  """The square covers [centre - size//2, centre - size//2 + size) before clipping to the image."""
  return stop - size + size // 2 if start == 0 else start + size // 2


def _check_side(start: int, stop: int, size: int) -> None:
  if 0 < start and stop < SIDE:
    assert stop - start == size
  else:
    assert size - size // 2 <= stop - start <= size


@pytest.mark.parametrize('size', [4, 3])
def test_cutout_erases_exactly_a_clipped_square_to_zero(size):
  n, mean, std = 1500, (0.5, 0.5, 0.5), (0.2, 0.3, 0.25)  # 127.5 is no pixel value: no natural zeros.
  images = np.random.default_rng(2).integers(0, 256, (n, SIDE, SIDE, 3), dtype=np.uint8)
  out = _augment(images, _config(('cutout',), cutout_size=size), mean, std, key=3)
  expected = np.asarray(augment.normalize(images, mean, std))
  zero = out == 0
  assert np.array_equal(zero.any(axis=-1), zero.all(axis=-1)), 'a pixel was erased in some channels only'
  np.testing.assert_array_equal(np.where(zero, expected, out), expected)
  centres = set()
  for erased in zero.all(axis=-1):
    top, bottom, left, right = _erased_box(erased)
    _check_side(top, bottom, size)
    _check_side(left, right, size)
    centres.add((_centre(top, bottom, size), _centre(left, right, size)))
  assert centres == {(y, x) for y in range(SIDE) for x in range(SIDE)}


def test_same_key_same_output_and_every_example_its_own_draw():
  images = _copies(_unique_image(), 32)
  ops = ('crop', 'flip', 'cutout')
  first, again, other = (_pixels(images, ops, key=k) for k in (7, 7, 8))
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)
  assert len({example.tobytes() for example in first}) > 28


def test_example_keys_are_fold_ins_of_the_index():
  key = jax.random.fold_in(jax.random.key(42), 1000)
  keys = augment.example_keys(key, 5)
  for i in range(5):
    expected = jax.random.fold_in(key, i)
    np.testing.assert_array_equal(jax.random.key_data(keys[i]), jax.random.key_data(expected))


def test_augment_batch_under_jit_matches_eager():
  config, mean, std = _config(('crop', 'flip', 'cutout')), (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
  images = np.random.default_rng(4).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
  context = {'indices': jnp.arange(4), 'epoch': 1, 'seed': 0}
  jitted = jax.jit(lambda x, key: augment.augment_batch(x, key, config, mean, std, **context))
  key = jax.random.key(5)
  np.testing.assert_allclose(
    jitted(images, key), augment.augment_batch(images, key, config, mean, std, **context), rtol=1e-6, atol=1e-6
  )


def test_unknown_op_fails_augment_batch_before_any_work():
  with pytest.raises(ValueError, match="'blur'.*registered ops are crop, flip"):
    _augment(np.zeros((1, 4, 4, 3), np.uint8), _config(('blur',)), ZERO_MEAN, UNIT_STD)


def test_channel_stats_equals_numpy():
  images = np.random.default_rng(6).integers(0, 256, (37, 5, 6, 3), dtype=np.uint8)
  mean, std = augment.channel_stats(images, chunk_size=8)
  scaled = images / 255
  assert all(isinstance(v, float) for v in mean + std) and len(mean) == len(std) == 3
  np.testing.assert_allclose(mean, scaled.mean(axis=(0, 1, 2)), rtol=1e-12)
  np.testing.assert_allclose(std, scaled.std(axis=(0, 1, 2)), rtol=1e-10)


def _run_python(code: str, **env) -> str:
  result = subprocess.run(
    [sys.executable, '-c', textwrap.dedent(code)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu', **env},
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_augment_works_where_tensorflow_cannot_be_imported():
  out = _run_python("""
      import sys
      sys.modules['tensorflow'] = None  # Any `import tensorflow` now raises ImportError.
      import jax, numpy as np
      from configs import default
      from resnet_flax.data import augment
      config = default.get_config().augment
      config.train_ops = ('crop', 'flip', 'cutout')
      context = {'indices': np.arange(4), 'epoch': 0, 'seed': 0}
      augment_fn = jax.jit(lambda x, key: augment.augment_batch(x, key, config, (0.5,) * 3, (0.2,) * 3, **context))
      out = augment_fn(np.zeros((4, 8, 8, 3), np.uint8), jax.random.key(0))
      print(out.shape, out.dtype)
      """)
  assert out.strip() == '(4, 8, 8, 3) float32'


def test_sharded_batch_gives_the_same_result_as_one_device():
  out = _run_python(
    """
      import jax, numpy as np
      from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
      from configs import default
      from resnet_flax.data import augment
      mesh = jax.make_mesh((4,), ('data',), axis_types=(AxisType.Auto,))
      shard = lambda x: jax.device_put(x, NamedSharding(mesh, P('data')))
      images = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)
      indices = np.arange(100, 108)
      # The second config's alternating_flip reads the (sharded) indices.
      for ops, alternating_flip in ((('crop', 'flip', 'cutout'), False), (('crop', 'cutout'), True)):
        config = default.get_config().augment
        config.train_ops, config.alternating_flip = ops, alternating_flip
        fn = jax.jit(lambda x, key, i: augment.augment_batch(
          x, key, config, (0.5,) * 3, (0.2,) * 3, indices=i, epoch=1, seed=0))
        sharded = fn(shard(images), jax.random.key(1), shard(indices))
        single = fn(jax.device_put(images, jax.devices()[0]), jax.random.key(1), indices)
        print(len(sharded.sharding.device_set), np.array_equal(np.asarray(sharded), np.asarray(single)))
      """,
    XLA_FLAGS=xla_flags(4),
  )
  assert out.split() == ['4', 'True'] * 2
