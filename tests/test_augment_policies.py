"""AutoAugment, RandAugment, TrivialAugment: each image op against PIL or a hand-made fixture, and
each policy's draws (ops replaced by markers that record what was applied), under jit and vmap.

Tolerances against Pillow (13 tested; ImageOps / ImageEnhance on the same uint8 image): exact for
every colour op but AutoContrast, which PIL computes in float64 (`int(x * scale + offset)`) and so
sometimes truncates an exact integer to the one below: within 1 level there, >= 99% of values exact.
Geometric ops: exact against hand-shifted, -sheared and -rotated fixtures; against PIL's own
`rotate`/`transform` at most 1% of pixels may differ (a sample point within float32 rounding of a
pixel edge may take the neighbour: float32 here, float64 in PIL).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps
from scipy import stats

from configs import default
from resnet_flax.data import augment, policies

SIDE = 32
FILL = policies.FILL
ZERO_MEAN, UNIT_STD = (0.0,) * 3, (1.0,) * 3


def _fixtures() -> list[np.ndarray]:
  """Full-range noise, a low-contrast image, a smooth gradient, and one with a constant channel."""
  rng = np.random.default_rng(0)
  gradient = np.add.outer(np.arange(SIDE), np.arange(SIDE))[..., None] * np.array([4, 2, 1]) % 256
  few_values = rng.choice(np.array([10, 200], np.uint8), (SIDE, SIDE, 3))
  few_values[..., 2] = 77
  return [
    rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8),
    rng.integers(60, 121, (SIDE, SIDE, 3), dtype=np.uint8),
    gradient.astype(np.uint8),
    few_values,
  ]


FIXTURES = _fixtures()
ENHANCE_FACTORS = (0.0, 0.1, 0.5, 0.9, 1.0, 1.3, 1.99)


def _differences(ours, reference) -> np.ndarray:
  ours = np.asarray(ours)
  assert ours.dtype == np.uint8 and ours.shape == (SIDE, SIDE, 3)
  return np.abs(ours.astype(np.int64) - np.asarray(reference, np.int64))


def _pil_affine(image: np.ndarray, coefficients) -> np.ndarray:
  pil = Image.fromarray(image)
  return np.asarray(pil.transform(pil.size, Image.Transform.AFFINE, coefficients, fillcolor=(FILL,) * 3))


ENHANCERS = {
  'brightness': (policies.brightness, ImageEnhance.Brightness),
  'color': (policies.color, ImageEnhance.Color),
  'contrast': (policies.contrast, ImageEnhance.Contrast),
  'sharpness': (policies.sharpness, ImageEnhance.Sharpness),
}


@pytest.mark.parametrize('name', sorted(ENHANCERS))
def test_enhance_ops_equal_pil_exactly(name):
  ours, pil_enhancer = ENHANCERS[name]
  jitted = jax.jit(ours)
  for image in FIXTURES:
    for factor in ENHANCE_FACTORS:
      reference = pil_enhancer(Image.fromarray(image)).enhance(factor)
      assert _differences(jitted(image, factor), reference).max() == 0, (name, factor)


@pytest.mark.parametrize(
  'name, ours, pil_op',
  [
    ('invert', policies.invert, ImageOps.invert),
    ('equalize', policies.equalize, ImageOps.equalize),
  ],
)
def test_unary_ops_equal_pil_exactly(name, ours, pil_op):
  for image in FIXTURES:
    assert _differences(jax.jit(ours)(image), pil_op(Image.fromarray(image))).max() == 0, name


def test_auto_contrast_is_within_one_level_of_pil():
  for image in FIXTURES + [np.random.default_rng(1).integers(37, 219, (SIDE, SIDE, 3), dtype=np.uint8)]:
    reference = ImageOps.autocontrast(Image.fromarray(image))
    differences = _differences(jax.jit(policies.auto_contrast)(image), reference)
    assert differences.max() <= 1 and (differences == 0).mean() >= 0.99
  stretched = np.asarray(policies.auto_contrast(FIXTURES[1]))
  assert stretched[..., :2].min() == 0 and stretched.max() == 255


def test_posterize_and_solarize_equal_pil_exactly():
  for image in FIXTURES:
    pil = Image.fromarray(image)
    for bits in range(1, 9):
      assert _differences(policies.posterize(image, bits), ImageOps.posterize(pil, bits)).max() == 0, bits
    for threshold in (0, 1, 100, 128, 255, 256):
      assert _differences(policies.solarize(image, threshold), ImageOps.solarize(pil, threshold)).max() == 0


def _shifted(image: np.ndarray, rows: int, cols: int) -> np.ndarray:
  """The image moved down by `rows` and right by `cols`, FILL where nothing came in."""
  height, width, _ = image.shape
  out = np.full_like(image, FILL)
  out[max(rows, 0) : height + min(rows, 0), max(cols, 0) : width + min(cols, 0)] = image[
    max(-rows, 0) : height - max(rows, 0), max(-cols, 0) : width - max(cols, 0)
  ]
  return out


@pytest.mark.parametrize('pixels', [3, -5, 14, 32])
def test_translations_move_the_content_by_whole_pixels(pixels):
  image = FIXTURES[0]
  np.testing.assert_array_equal(policies.translate_x(image, pixels), _shifted(image, 0, pixels))
  np.testing.assert_array_equal(policies.translate_y(image, pixels), _shifted(image, pixels, 0))


@pytest.mark.parametrize('factor', [0.5, -0.5])
def test_shears_move_each_line_in_proportion_to_its_distance_from_the_top_left_corner(factor):
  """PIL's (1, m, 0, 0, 1, 0): output column x of row y samples x + 1/2 + m (y + 1/2), m = +-1/2."""
  image, sign = FIXTURES[0], int(np.sign(factor))
  expected_x, expected_y = np.full_like(image, FILL), np.full_like(image, FILL)
  for y in range(SIDE):
    for x in range(SIDE):
      source = x + sign * ((y + 1) // 2)
      if 0 <= source < SIDE:
        expected_x[y, x] = image[y, source]
        expected_y[x, y] = image[source, y]
  np.testing.assert_array_equal(policies.shear_x(image, factor), expected_x)
  np.testing.assert_array_equal(policies.shear_y(image, factor), expected_y)


def test_rotate_quarter_and_half_turns_are_exact_and_counter_clockwise():
  image = FIXTURES[0]
  np.testing.assert_array_equal(policies.rotate(image, 90), np.rot90(image))
  np.testing.assert_array_equal(policies.rotate(image, -90), np.rot90(image, -1))
  np.testing.assert_array_equal(policies.rotate(image, 180), image[::-1, ::-1])


def test_geometric_ops_agree_with_pil():
  pil_rotate = lambda image, degrees: np.asarray(Image.fromarray(image).rotate(degrees, fillcolor=(FILL,) * 3))
  cases = (
    [(policies.rotate, pil_rotate, d) for d in (30, -12.5, 77)]
    + [(policies.shear_x, lambda image, m: _pil_affine(image, (1, m, 0, 0, 1, 0)), m) for m in (0.3, -0.99)]
    + [(policies.shear_y, lambda image, m: _pil_affine(image, (1, 0, 0, m, 1, 0)), m) for m in (0.3, -0.99)]
  )
  for ours, reference, parameter in cases:
    for image in FIXTURES[:3]:
      mismatched = np.any(_differences(ours(image, parameter), reference(image, parameter)) > 0, axis=-1)
      assert mismatched.mean() <= 0.01, (ours.__name__, parameter, mismatched.sum())


STRENGTH_ZERO_CHANGES = ('AutoContrast', 'Equalize', 'Invert', 'Solarize')


@pytest.mark.parametrize('name', sorted(set(policies.POLICY_OPS) - set(STRENGTH_ZERO_CHANGES)))
def test_strength_zero_is_the_identity(name):
  apply = jax.jit(policies.POLICY_OPS[name].apply)
  for image in FIXTURES:
    np.testing.assert_array_equal(apply(image, 0.0), image)
  if name != 'Identity':  # ... and a real strength is not.
    assert not np.array_equal(apply(FIXTURES[0], 0.5 * policies.WIDE_SPACE[name]), FIXTURES[0])


def test_solarize_at_strength_zero_only_inverts_white():
  """torchvision's threshold is 255 - strength, so its weakest Solarize still maps 255 to 0."""
  image = FIXTURES[0]
  np.testing.assert_array_equal(policies.POLICY_OPS['Solarize'].apply(image, 0.0), np.where(image == 255, 0, image))


def _config(ops, **overrides):
  config = default.get_config().augment
  config.train_ops = tuple(ops)
  config.update(overrides)
  return config


def _augmenter(ops, **overrides):
  """augment_batch under jit (traced at the first call), with identity normalization: (images, key)
  -> the exact pixel values."""
  config = _config(ops, **overrides)
  augment_fn = jax.jit(
    lambda x, k, i: augment.augment_batch(x, k, config, ZERO_MEAN, UNIT_STD, indices=i, epoch=0, seed=0)
  )

  def pixels(images, key: int) -> np.ndarray:
    out = np.asarray(augment_fn(images, jax.random.key(key), jnp.arange(len(images))))
    assert out.dtype == np.float32 and out.shape == images.shape
    np.testing.assert_allclose(out * 255, np.rint(out * 255), atol=1e-3)  # Still whole uint8 levels.
    return np.rint(out * 255).astype(np.int64)

  return pixels


@pytest.mark.parametrize('policy', ['autoaugment', 'randaugment', 'trivialaugment'])
def test_policies_run_per_example_under_jit_and_vmap(policy):
  """uint8 in, uint8 out (lax.switch refuses branches of other dtypes; here: whole levels in 0..255)."""
  side, batch = 16, 48
  images = np.broadcast_to(FIXTURES[0][:side, :side], (batch, side, side, 3)).copy()
  pixels = _augmenter(('flip', policy))
  first, again, other = (pixels(images, key) for key in (3, 3, 4))
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)
  assert np.all((first >= 0) & (first <= 255))
  assert len({example.tobytes() for example in first}) > batch // 3, 'examples share their draws'


def test_policies_need_uint8_pixels_and_randaugment_a_magnitude_in_range():
  images = np.zeros((2, 8, 8, 3), np.uint8)
  with pytest.raises(ValueError, match='before cutout'):
    _augmenter(('cutout', 'trivialaugment'))(images, 0)
  with pytest.raises(ValueError, match=r"'randaugment': magnitude=31 \(from augment.randaugment_magnitude\).* 0\.\.30"):
    _augmenter(('randaugment',), randaugment_magnitude=31)(images, 0)
  with pytest.raises(ValueError, match=r"'randaugment': num_ops=-1 must be an integer >= 0"):
    _augmenter(('randaugment(num_ops=-1)',))(images, 0)


def _install_markers(monkeypatch, names, space):
  """Replaces each op names[i] by a marker: pixel (0, i) counts its applications in channel 0 and
  holds the magnitude level (|strength| / maximum as a fraction of 30) in channel 1, and whether
  the strength was negative in channel 2."""
  for index, name in enumerate(names):
    maximum = space.get(name, 0.0) or 1.0

    def marker(image, strength, index=index, maximum=maximum):
      level = jnp.round(jnp.abs(strength) / maximum * 30).astype(jnp.uint8)
      return image.at[0, index].set(jnp.stack([image[0, index, 0] + 1, level, (strength < 0).astype(jnp.uint8)]))

    monkeypatch.setitem(policies.POLICY_OPS, name, policies.PolicyOp(marker, policies.POLICY_OPS[name].signed))


def _marked(policy, num_images, names, **overrides) -> np.ndarray:
  """[num_images, len(names), 3]: the markers' records, one row per op."""
  images = np.zeros((num_images, 1, len(names), 3), np.uint8)
  return _augmenter((policy,), **overrides)(images, 11)[:, 0]


def test_trivialaugment_draws_one_op_uniformly_at_a_uniform_level(monkeypatch):
  names, draws = policies.RAND_OPS, 4200
  _install_markers(monkeypatch, names, policies.WIDE_SPACE)
  records = _marked('trivialaugment', draws, names)
  assert np.all(records[..., 0].sum(axis=1) == 1), 'not exactly one op per image'
  op = records[..., 0].argmax(axis=1)
  assert stats.chisquare(np.bincount(op, minlength=len(names))).pvalue > 1e-3
  chosen = records[np.arange(draws), op]
  with_strength = np.isin(op, [names.index(n) for n in policies.WIDE_SPACE])
  assert stats.chisquare(np.bincount(chosen[with_strength, 1], minlength=31)).pvalue > 1e-3
  signed = np.isin(op, [i for i, n in enumerate(names) if policies.POLICY_OPS[n].signed])
  assert stats.binomtest(int(chosen[signed, 2].sum()), int(signed.sum())).pvalue > 1e-3
  assert not chosen[~signed, 2].any(), 'an unsigned op got a negative strength'


def test_randaugment_applies_n_uniform_ops_at_magnitude_m(monkeypatch):
  names, images, num_ops, magnitude = policies.RAND_OPS, 1500, 3, 27
  _install_markers(monkeypatch, names, policies.standard_space(1, len(names)))
  records = _marked('randaugment', images, names, randaugment_num_ops=num_ops, randaugment_magnitude=magnitude)
  counts = records[..., 0]
  assert np.all(counts.sum(axis=1) == num_ops)
  assert stats.chisquare(counts.sum(axis=0)).pvalue > 1e-3
  with_strength = [names.index(n) for n in ('ShearX', 'Rotate', 'Brightness', 'Posterize', 'Solarize')]
  applied = counts[:, with_strength] > 0
  assert np.all(records[:, with_strength, 1][applied] == magnitude)


def test_autoaugment_applies_each_op_at_the_policy_rates(monkeypatch):
  names, images = policies.AUTOAUGMENT_OPS, 4000
  _install_markers(monkeypatch, names, policies.standard_space(1, len(names)))
  records = _marked('autoaugment', images, names)
  counts = records[..., 0]
  assert np.all(counts.sum(axis=1) == 2), 'not two steps per image'
  policy = policies.AUTOAUGMENT_CIFAR10
  for index, name in enumerate(names[1:], start=1):
    rate = sum(p for sub in policy for op, p, _ in sub if op == name) / len(policy)
    mean, variance = counts[:, index].mean(), counts[:, index].var()
    assert abs(mean - rate) <= 5 * np.sqrt(max(variance, rate * (1 - rate) / 4) / images), (name, mean, rate)
    # The last application's level, on the markers' 0..30 scale: level / 9 of the maximum.
    levels = {round(level / 9 * 30) for sub in policy for op, _, level in sub if op == name and level is not None}
    assert set(records[counts[:, index] > 0, index, 1]) <= (levels or {0}), name


def test_autoaugment_table_is_the_25_cifar10_sub_policies():
  policy = policies.AUTOAUGMENT_CIFAR10
  assert len(policy) == 25 and all(len(sub) == 2 for sub in policy)
  space = policies.standard_space(SIDE, SIDE)
  for sub in policy:
    for name, probability, level in sub:
      assert name in policies.POLICY_OPS and name != 'Identity'
      assert 0 <= probability <= 1
      assert (level is None) == (name not in space), name
      assert level is None or 0 <= level < policies.AUTOAUGMENT_LEVELS
  assert policy[0] == (('Invert', 0.1, None), ('Contrast', 0.2, 6))
  assert policy[-1] == (('TranslateY', 0.7, 9), ('AutoContrast', 0.9, None))


def test_check_ops_accepts_the_policies_and_names_them_in_errors():
  augment.check_ops(_config(('crop', 'flip', 'autoaugment', 'randaugment', 'trivialaugment', 'cutout')))
  assert {'autoaugment', 'randaugment', 'trivialaugment'} <= set(augment.OPS)
  with pytest.raises(ValueError, match='trivialaugment'):
    augment.check_ops(_config(('autoaugmentation',)))


def test_randaugment_arguments_in_the_op_string_equal_the_config_fields():
  images = np.broadcast_to(FIXTURES[0][:16, :16], (24, 16, 16, 3)).copy()
  from_fields = _augmenter(('randaugment',), randaugment_num_ops=1, randaugment_magnitude=20)(images, 5)
  from_string = _augmenter(('randaugment(num_ops=1, magnitude=20)',))(images, 5)
  np.testing.assert_array_equal(from_string, from_fields)
  assert not np.array_equal(from_string, _augmenter(('randaugment',))(images, 5))  # Defaults: 2 ops at 9.
