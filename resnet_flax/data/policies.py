"""AutoAugment, RandAugment and TrivialAugment: per-example uint8 image ops and the policies that draw them.

The policies share one table of image ops, `POLICY_OPS`, with PIL's semantics (ImageOps and
ImageEnhance, as torchvision applies them to PIL images) and torchvision's magnitude ranges, so a
recipe tuned with torchvision means the same here. Geometric ops resample with nearest neighbour
(torchvision's default) and fill with grey 128 (the AutoAugment code's fill). All ops are written
here rather than taken from dm_pix: its colour ops follow tf.image (per-channel contrast mean,
additive brightness, HSV saturation, solarize of [0, 1] floats), not PIL, and its affine_transform
is far slower than `_affine` (see there).

Each example draws its own op, so the op index is traced: under `vmap`, `lax.switch` evaluates every
op of the policy and selects one per example: each op applied (TrivialAugment: one, RandAugment: N,
AutoAugment: two) costs about as much as all the policy's ops together, Equalize's histogram,
Sharpness and the five resamplings being most of it. benchmarks/augment_cost.py measures what each
policy adds to a train step.

`augment` registers the three policies as train ops; this module knows nothing of configs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Image ops of the policies: one uint8 [H, W, C] image in, one out, PIL's arithmetic.

FILL = 128  # Grey for the pixels that geometric ops bring in from outside the image.
Scalar = float | jax.Array  # A Python number or a traced 0-d array.


def _affine(image: jax.Array, a: Scalar, b: Scalar, c: Scalar, d: Scalar, e: Scalar, f: Scalar) -> jax.Array:
  """PIL's `image.transform(size, AFFINE, (a, b, c, d, e, f), NEAREST, fillcolor=FILL)`.

  Output pixel (column x, row y) takes the input pixel that contains the point (a x' + b y' + c,
  d x' + e y' + f), x' = x + 1/2 and y' = y + 1/2 being the pixel's centre, or FILL outside the image.
  Written by hand: dm_pix.affine_transform resamples through map_coordinates over all three axes,
  which is far slower on CPU, nearest neighbour and bilinear alike.
  """
  height, width, _ = image.shape
  y, x = jnp.mgrid[0:height, 0:width].astype(jnp.float32) + 0.5
  source_x = jnp.floor(a * x + b * y + c).astype(jnp.int32)
  source_y = jnp.floor(d * x + e * y + f).astype(jnp.int32)
  inside = (source_x >= 0) & (source_x < width) & (source_y >= 0) & (source_y < height)
  pixels = image[jnp.clip(source_y, 0, height - 1), jnp.clip(source_x, 0, width - 1)]
  return jnp.where(inside[..., None], pixels, FILL).astype(image.dtype)


def rotate(image: jax.Array, degrees: Scalar) -> jax.Array:
  """PIL's `image.rotate(degrees)`: counter-clockwise about the image centre."""
  height, width, _ = image.shape
  cos, sin = jnp.cos(jnp.deg2rad(degrees)), jnp.sin(jnp.deg2rad(degrees))
  centre_x, centre_y = width / 2, height / 2
  return _affine(
    image, cos, -sin, centre_x - cos * centre_x + sin * centre_y, sin, cos, centre_y - sin * centre_x - cos * centre_y
  )


def shear_x(image: jax.Array, factor: Scalar) -> jax.Array:
  """Row y moves left by factor * y (PIL coordinates): the AutoAugment code's (1, factor, 0, 0, 1, 0)."""
  return _affine(image, 1, factor, 0, 0, 1, 0)


def shear_y(image: jax.Array, factor: Scalar) -> jax.Array:
  return _affine(image, 1, 0, 0, factor, 1, 0)


def translate_x(image: jax.Array, pixels: Scalar) -> jax.Array:
  """Moves the content right by `pixels` (whole pixels: the policies truncate, as torchvision)."""
  return _affine(image, 1, 0, -pixels, 0, 1, 0)


def translate_y(image: jax.Array, pixels: Scalar) -> jax.Array:
  return _affine(image, 1, 0, 0, 0, 1, -pixels)


def _blend(degenerate: jax.Array, image: jax.Array, factor: Scalar) -> jax.Array:
  """PIL's `Image.blend(degenerate, image, factor)`, the core of ImageEnhance: float32, truncated."""
  degenerate = degenerate.astype(jnp.float32)
  return jnp.clip(degenerate + factor * (image - degenerate), 0, 255).astype(jnp.uint8)


def _grayscale(image: jax.Array) -> jax.Array:
  """PIL's `convert('L')`, exact: ITU-R 601 luma in 16-bit fixed point, rounded. [H, W, 1] int32."""
  red, green, blue = jnp.moveaxis(image.astype(jnp.int32), -1, 0)
  return ((red * 19595 + green * 38470 + blue * 7471 + 0x8000) >> 16)[..., None]


def brightness(image: jax.Array, factor: Scalar) -> jax.Array:
  """ImageEnhance.Brightness: blends with black."""
  return _blend(jnp.zeros_like(image), image, factor)


def color(image: jax.Array, factor: Scalar) -> jax.Array:
  """ImageEnhance.Color: blends with the grey version (0 gives grey, 1 the image)."""
  return _blend(_grayscale(image), image, factor)


def contrast(image: jax.Array, factor: Scalar) -> jax.Array:
  """ImageEnhance.Contrast: blends with the mean grey level, rounded (one value, not one per channel)."""
  grey = _grayscale(image)
  mean = jnp.floor(jnp.sum(grey) / grey.size + 0.5)
  return _blend(jnp.full_like(grey, mean), image, factor)


def _smooth(image: jax.Array) -> jax.Array:
  """PIL's ImageFilter.SMOOTH (3x3 kernel 1 1 1 / 1 5 1 / 1 1 1, over 13, rounded); the border is kept."""
  pixels = image.astype(jnp.float32)
  rows = pixels[:-2] + pixels[1:-1] + pixels[2:]
  total = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:] + 4 * pixels[1:-1, 1:-1]
  return jnp.asarray(image).at[1:-1, 1:-1].set(jnp.round(total / 13).astype(jnp.uint8))


def sharpness(image: jax.Array, factor: Scalar) -> jax.Array:
  """ImageEnhance.Sharpness: blends with the smoothed image (0 blurs, 2 sharpens)."""
  return _blend(_smooth(image), image, factor)


def posterize(image: jax.Array, bits: Scalar) -> jax.Array:
  """ImageOps.posterize: keeps the `bits` high bits of each value."""
  shift = jnp.asarray(8 - bits, jnp.uint8)
  return (image >> shift) << shift


def solarize(image: jax.Array, threshold: Scalar) -> jax.Array:
  """ImageOps.solarize: inverts the values >= threshold."""
  return jnp.where(image < threshold, image, 255 - image)


def invert(image: jax.Array) -> jax.Array:
  return 255 - image


def _auto_contrast_channel(channel: jax.Array) -> jax.Array:
  """floor(255 (x - lo) / (hi - lo)); PIL computes it in float64, which a few values miss by one."""
  low, high = jnp.min(channel).astype(jnp.int32), jnp.max(channel).astype(jnp.int32)
  stretched = (channel - low) * 255 // jnp.maximum(high - low, 1)
  return jnp.where(high > low, stretched, channel).astype(jnp.uint8)


def _equalize_channel(channel: jax.Array) -> jax.Array:
  """PIL's lookup table: (step // 2 + pixels below the value) // step, step = (n - n_max) // 255.

  n_max counts the pixels of the highest value present; step = 0 (few pixels, or one value) leaves
  the channel as it is. The histogram is a scatter-add: the costliest op on CPU, where XLA runs
  scatters serially, yet cheaper there than one-hot counting or sorting.
  """
  histogram = jnp.zeros(256, jnp.int32).at[channel.ravel()].add(1)
  step = (channel.size - histogram[jnp.max(channel)]) // 255
  below = jnp.cumsum(histogram) - histogram
  lut = jnp.minimum((step // 2 + below) // jnp.maximum(step, 1), 255)
  return jnp.where(step > 0, lut[channel], channel).astype(jnp.uint8)


def _per_channel(channel_op: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
  return jax.vmap(channel_op, in_axes=-1, out_axes=-1)


auto_contrast = _per_channel(_auto_contrast_channel)  # ImageOps.autocontrast: each channel to 0..255.
equalize = _per_channel(_equalize_channel)  # ImageOps.equalize: each channel's histogram flattened.


class PolicyOp(NamedTuple):
  """An op as the policies call it: `apply(image, strength)`, strength 0 the weakest setting.

  torchvision's conventions: the enhance ops take 1 + strength, Posterize removes `strength` bits
  (rounded), Solarize's threshold is 255 - strength (so strength 0 still inverts 255), translations
  truncate to whole pixels. Policies negate the strength of `signed` ops with probability 1/2.
  """

  apply: Callable[[jax.Array, jax.Array], jax.Array]
  signed: bool


def _enhance(enhance_op: Callable[[jax.Array, jax.Array], jax.Array]) -> PolicyOp:
  return PolicyOp(lambda image, strength: enhance_op(image, 1 + strength), True)


def _unary(image_op: Callable[[jax.Array], jax.Array]) -> PolicyOp:
  return PolicyOp(lambda image, strength: image_op(image), False)


POLICY_OPS: dict[str, PolicyOp] = {
  'Identity': _unary(lambda image: image),
  'ShearX': PolicyOp(shear_x, True),
  'ShearY': PolicyOp(shear_y, True),
  'TranslateX': PolicyOp(lambda image, pixels: translate_x(image, jnp.trunc(pixels)), True),
  'TranslateY': PolicyOp(lambda image, pixels: translate_y(image, jnp.trunc(pixels)), True),
  'Rotate': PolicyOp(rotate, True),
  'Brightness': _enhance(brightness),
  'Color': _enhance(color),
  'Contrast': _enhance(contrast),
  'Sharpness': _enhance(sharpness),
  'Posterize': PolicyOp(lambda image, bits_removed: posterize(image, 8 - jnp.round(bits_removed)), False),
  'Solarize': PolicyOp(lambda image, strength: solarize(image, 255 - strength), False),
  'AutoContrast': _unary(auto_contrast),
  'Equalize': _unary(equalize),
  'Invert': _unary(invert),
}
_ENHANCE_OPS = ('Brightness', 'Color', 'Contrast', 'Sharpness')

# RandAugment's and TrivialAugment's ops, in torchvision's order (no Invert).
RAND_OPS = tuple(name for name in POLICY_OPS if name != 'Invert')
NUM_LEVELS = 31  # RandAugment's and TrivialAugment's magnitude scale: levels 0..30, as torchvision.

# TrivialAugment Wide's maximum strengths (translation in pixels, whatever the image size).
WIDE_SPACE = {
  'ShearX': 0.99,
  'ShearY': 0.99,
  'TranslateX': 32.0,
  'TranslateY': 32.0,
  'Rotate': 135.0,
  **dict.fromkeys(_ENHANCE_OPS, 0.99),
  'Posterize': 6.0,
  'Solarize': 255.0,
}


def standard_space(height: int, width: int) -> dict[str, float]:
  """AutoAugment's and RandAugment's maximum strengths; translation up to 150/331 of the side."""
  return {
    'ShearX': 0.3,
    'ShearY': 0.3,
    'TranslateX': 150 / 331 * width,
    'TranslateY': 150 / 331 * height,
    'Rotate': 30.0,
    **dict.fromkeys(_ENHANCE_OPS, 0.9),
    'Posterize': 4.0,
    'Solarize': 255.0,
  }


# The AutoAugment CIFAR-10 policy: 25 sub-policies of two (op, probability, magnitude level 0..9)
# steps, level None for ops without a magnitude (torchvision's transcription of the paper's table).
AUTOAUGMENT_CIFAR10 = (
  (('Invert', 0.1, None), ('Contrast', 0.2, 6)),
  (('Rotate', 0.7, 2), ('TranslateX', 0.3, 9)),
  (('Sharpness', 0.8, 1), ('Sharpness', 0.9, 3)),
  (('ShearY', 0.5, 8), ('TranslateY', 0.7, 9)),
  (('AutoContrast', 0.5, None), ('Equalize', 0.9, None)),
  (('ShearY', 0.2, 7), ('Posterize', 0.3, 7)),
  (('Color', 0.4, 3), ('Brightness', 0.6, 7)),
  (('Sharpness', 0.3, 9), ('Brightness', 0.7, 9)),
  (('Equalize', 0.6, None), ('Equalize', 0.5, None)),
  (('Contrast', 0.6, 7), ('Sharpness', 0.6, 5)),
  (('Color', 0.7, 7), ('TranslateX', 0.5, 8)),
  (('Equalize', 0.3, None), ('AutoContrast', 0.4, None)),
  (('TranslateY', 0.4, 3), ('Sharpness', 0.2, 6)),
  (('Brightness', 0.9, 6), ('Color', 0.2, 8)),
  (('Solarize', 0.5, 2), ('Invert', 0.0, None)),
  (('Equalize', 0.2, None), ('AutoContrast', 0.6, None)),
  (('Equalize', 0.2, None), ('Equalize', 0.6, None)),
  (('Color', 0.9, 9), ('Equalize', 0.6, None)),
  (('AutoContrast', 0.8, None), ('Solarize', 0.2, 8)),
  (('Brightness', 0.1, 3), ('Color', 0.7, 0)),
  (('Solarize', 0.4, 5), ('AutoContrast', 0.9, None)),
  (('TranslateY', 0.9, 9), ('TranslateY', 0.7, 9)),
  (('AutoContrast', 0.9, None), ('Solarize', 0.8, 3)),
  (('Equalize', 0.8, None), ('Invert', 0.1, None)),
  (('TranslateY', 0.7, 9), ('AutoContrast', 0.9, None)),
)
AUTOAUGMENT_LEVELS = 10
# The ops the policy uses, Identity first: a step that does not fire applies op 0.
AUTOAUGMENT_OPS = ('Identity',) + tuple(sorted({name for sub in AUTOAUGMENT_CIFAR10 for name, _, _ in sub}))


def _policy_table(policy: Sequence, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(op index into names, probability, magnitude as a fraction of the maximum), each [sub-policies, 2]."""
  ops = np.array([[names.index(name) for name, _, _ in sub] for sub in policy], np.int32)
  probabilities = np.array([[p for _, p, _ in sub] for sub in policy], np.float32)
  levels = np.array([[level or 0 for _, _, level in sub] for sub in policy], np.float32)
  return ops, probabilities, levels / (AUTOAUGMENT_LEVELS - 1)


def _apply_policy_op(
  key: jax.Array, image: jax.Array, names: Sequence[str], space: dict[str, float], op: jax.Array, fraction: Scalar
) -> jax.Array:
  """Applies names[op] at `fraction` of its maximum strength in `space`, signed ops negated at random."""
  if image.dtype != jnp.uint8:
    raise ValueError(
      'autoaugment, randaugment and trivialaugment work on uint8 pixels: put them before cutout in train_ops.'
    )
  maximum = jnp.array([space.get(name, 0.0) for name in names])[op]
  signed = jnp.array([POLICY_OPS[name].signed for name in names])[op]
  strength = jnp.where(signed & jax.random.bernoulli(key), -maximum, maximum) * fraction
  return jax.lax.switch(op, [POLICY_OPS[name].apply for name in names], image, strength)


def trivialaugment(key: jax.Array, image: jax.Array) -> jax.Array:
  """TrivialAugment Wide (Muller & Hutter, 2021): one op of RAND_OPS, at one of NUM_LEVELS strengths of WIDE_SPACE."""
  op_key, level_key, sign_key = jax.random.split(key, 3)
  op = jax.random.randint(op_key, (), 0, len(RAND_OPS))
  fraction = jax.random.randint(level_key, (), 0, NUM_LEVELS) / (NUM_LEVELS - 1)
  return _apply_policy_op(sign_key, image, RAND_OPS, WIDE_SPACE, op, fraction)


def randaugment(key: jax.Array, image: jax.Array, *, num_ops: int, magnitude: float) -> jax.Array:
  """RandAugment (Cubuk et al., 2020): `num_ops` ops of RAND_OPS drawn with replacement, all at
  `magnitude` on the 0..NUM_LEVELS - 1 scale of `standard_space`."""
  space = standard_space(*image.shape[:2])
  for position in range(num_ops):
    op_key, sign_key = jax.random.split(jax.random.fold_in(key, position))
    op = jax.random.randint(op_key, (), 0, len(RAND_OPS))
    image = _apply_policy_op(sign_key, image, RAND_OPS, space, op, magnitude / (NUM_LEVELS - 1))
  return image


def autoaugment(key: jax.Array, image: jax.Array) -> jax.Array:
  """The AutoAugment CIFAR-10 policy (Cubuk et al., 2019): one of its 25 sub-policies, each step at its rate."""
  space = standard_space(*image.shape[:2])
  ops, probabilities, fractions = map(jnp.asarray, _policy_table(AUTOAUGMENT_CIFAR10, AUTOAUGMENT_OPS))
  sub_policy_key, *step_keys = jax.random.split(key, 3)
  sub_policy = jax.random.randint(sub_policy_key, (), 0, len(AUTOAUGMENT_CIFAR10))
  for step, step_key in enumerate(step_keys):
    fire_key, sign_key = jax.random.split(step_key)
    fires = jax.random.uniform(fire_key) < probabilities[sub_policy, step]
    op = jnp.where(fires, ops[sub_policy, step], 0)
    image = _apply_policy_op(sign_key, image, AUTOAUGMENT_OPS, space, op, fractions[sub_policy, step])
  return image
