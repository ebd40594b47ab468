"""CIFAR-10-C: the 15 corruptions of Hendrycks & Dietterich (2019) at 5 severities, and how they run.

The published CIFAR-10-C arrays hold the 10,000 CIFAR-10 test images only: a model trained on other
images, at another size, or evaluated on a subset has nothing to be scored on, and the library that
made them (`imagecorruptions`) fails on current numpy/scikit-image and uses ImageNet-C's constants.
So they are generated here, with the CIFAR constants of hendrycks/robustness
`ImageNet-C/create_c/make_cifar_c.py` (they differ from ImageNet-C's: gaussian_noise sigma
.04-.10 against .08-.38), in JAX: one jitted `vmap` over images per corruption (a severity's constants
are arguments of it), so the generation runs where the model does, compiling 13 programs, not 65
(pixelate and jpeg_compression are Pillow's, on the host). `CORRUPTIONS` maps the names to their functions
in the original's order; `corrupt` runs one (`corruption_cache.load_or_corrupt` caches the result; bump
`GENERATOR_VERSION` when an output changes); the filters, samplers and noise they are made of are in
`corruption_filters`. Matrix products run at full float32 precision everywhere; a GPU's transcendental
functions may still round an occasional pixel one level apart from a CPU's.

Every random draw of image i comes from key(seed) folded with the corruption's index, the severity
and i (its index in the test split), so an image's corruption never depends on the other images
of the batch, and the images are cut into calls of a fixed size (`PIXELS_PER_CALL`), so the same
compiled program makes it whatever the batch. The constants assume 32 px (CIFAR) images; any square
RGB size runs: constants in pixels (noise, blur radii, motion blur, glass blur) stay in pixels,
the size-relative ones follow the size (elastic's IMSIZE, pixelate's factor, the zoom crops, the
fractal map, which is the next power of two >= size, cropped).

Where this differs from the original (each chosen as the closest equivalent that runs here):
- Random numbers are jax.random draws per image, not numpy's one global, unseeded stream: same
  distributions, other samples (nobody can regenerate the published arrays bit for bit).
- float32 instead of float64, truncated to uint8 as the original's `np.uint8` does: where the exact
  value is an integer, rounding errors put either a hair below it, so up to 2% of the pixels (8% for
  brightness 4) end one level apart from the original's on the same draws (measured on the
  deterministic ones).
- glass_blur: the original's "swap" `x[h, w], x[h', w'] = x[h', w'], x[h, w]` acts on numpy views
  and copies x[h', w'] into x[h, w], leaving x[h', w'] alone; its sources lie up or left (offsets in
  {-1, 0}: `randint(-1, 1)`), which the loop (bottom right to top left) has not reached yet. So each
  pass is a parallel gather from the image before it, done so here: the same result, no 900-step loop.
  This holds for max_delta = 1, every CIFAR severity's.
- motion_blur and snow: ImageMagick's MotionBlurImage (through Wand) rewritten from its source: a
  half-Gaussian of 2 ceil(radius) + 1 taps along the angle, tap i at offset
  (ceil(i cos a - 1/2), ceil(i sin a - 1/2)), edge pixels repeated, rounded to 8 bits; ImageMagick
  computes with 16-bit quanta (a rounding difference at most).
- frost: the original blends a random 32 px crop of one of five frost photos (frost1-5, downscaled
  by 0.2); this repository holds no images, and a download would fail offline. The texture is
  generated instead: per image one of five styles with each photo's mean colour, its standard
  deviation within 32 px crops and its share of pixel-scale grain (measured on the photos:
  `FROST_STYLES`), made of Gaussian grain plus a plasma fractal, the same in every channel. Colour
  and contrast statistics match; the crystal shapes do not.
- elastic_transform: OpenCV's warpAffine interpolates with 1/32-pixel fixed-point weights, here
  exactly; scipy's map_coordinates (mode 'reflect') and JAX's differ within half a pixel of the border.
- zoom_blur and snow's zoom: scipy.ndimage.zoom (order 1, corners aligned) as an exact interpolation
  matrix rather than jax.image.scale_and_translate, whose half-pixel grid is not scipy's.
- brightness: skimage's rgb2hsv, value + c, hsv2rgb in closed form (each pixel scaled by its new
  value over its old one; black pixels become grey): the same up to float rounding.
- shot_noise: Poisson draws by inverting each 8-bit level's CDF with a uniform draw (exact to float32;
  jax.random.poisson's rejection loop was over 10 times slower on a CPU).
- defocus_blur (OpenCV's disk kernel and filter2D, BORDER_REFLECT_101), contrast, fog, gaussian and
  impulse noise (per-element salt and pepper, as skimage's random_noise) are the original's.
  pixelate and jpeg_compression run Pillow as the original does (bitwise, Pillow versions aside).

The mean pixel change from the clean image grows with severity for 11 corruptions, but not, in the
original either, for glass_blur (severity 3 < 2, 5 < 4: more blur smooths the shuffled pixels),
motion_blur (severities 3 and 4 share a kernel: sigma 2, whose taps beyond radius 6 weigh < 1e-3),
frost (severities 4 and 5 darken the image less than 3: c = (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))
and elastic_transform (severity 1 is the strongest affine warp, 5 the weakest; measured with the
original on 200 CIFAR-10 test images: 22.7, 20.3, 18.0, 16.3, 13.9 levels).
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from resnet_flax.data import DataError
from resnet_flax.robust import corruption_filters

GENERATOR_VERSION = 1  # Part of every cache key: bump it when any corruption's output changes.
SEVERITIES = (1, 2, 3, 4, 5)
CIFAR_SIZE = 32  # The image size make_cifar_c.py's constants are for.
PIXELS_PER_CALL = 256 * 32 * 32  # Images per compiled call: 256 CIFAR images, fewer larger ones.

# (images uint8 [N, S, S, 3], severity, seed, indices int [N]) -> corrupted uint8 [N, S, S, 3].
Corruption = Callable[[np.ndarray, int, int, np.ndarray], np.ndarray]
CORRUPTIONS: dict[str, Corruption] = {}  # In make_cifar_c.py's order.
# name -> (fn(image, key, **constants), constants(size): the keyword arguments of severities 1-5).
_ON_DEVICE: dict[str, tuple[Callable[..., jax.Array], Callable[[int], list[dict[str, Any]]]]] = {}


def corrupt(
  images: np.ndarray, name: str, severity: int, seed: int = 0, indices: Sequence[int] | None = None
) -> np.ndarray:
  """uint8 [N, S, S, 3] images with corruption `name` at `severity` (1-5); image i is drawn as the one of
  index `indices[i]` (default i), so a subset of the images gets the same corruptions."""
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3 or images.shape[1] != images.shape[2]:
    raise DataError(f'corruptions need uint8 [N, S, S, 3] (square RGB) images, got {images.dtype} {images.shape}')
  if name not in CORRUPTIONS or severity not in SEVERITIES:
    raise ValueError(f'unknown corruption {name!r} or severity {severity}: names {list(CORRUPTIONS)}, severities 1-5')
  indices = np.arange(len(images)) if indices is None else np.asarray(indices)
  return CORRUPTIONS[name](images, severity, seed, indices)


# Registration and the device runner.


def _on_device(constants: Callable[[int], list[dict[str, Any]]]) -> Callable:
  """Registers `fn(image, key, **constants)`: one float32 [S, S, 3] image in [0, 1] -> the corrupted image,
  whose values the runner clips to [0, 1] and truncates to uint8 as the original's `np.uint8` does.

  `constants(size)` lists the keyword arguments of severities 1 to 5 for S = size: numbers and arrays
  of the same shapes at every severity (padded where the original's differ), passed as traced
  arguments, so that a corruption compiles once, not once per severity.
  """

  def register(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    _ON_DEVICE[fn.__name__] = (fn, functools.cache(constants))
    CORRUPTIONS[fn.__name__] = functools.partial(_run_on_device, fn.__name__)
    return fn

  return register


def _on_host(fn: Callable[[np.ndarray, int], np.ndarray]) -> Callable[[np.ndarray, int], np.ndarray]:
  """Registers `fn(images, severity)`, deterministic uint8 -> uint8 work of Pillow's."""
  CORRUPTIONS[fn.__name__] = lambda images, severity, seed, indices: fn(images, severity)
  return fn


def image_key(seed: jax.Array, name: str, severity: jax.Array, index: jax.Array) -> jax.Array:
  """The key of every random draw corrupting image `index` with `name` at `severity`."""
  key = jax.random.fold_in(jax.random.key(seed), list(CORRUPTIONS).index(name))
  return jax.random.fold_in(jax.random.fold_in(key, severity), index)


@functools.partial(jax.jit, static_argnames='name')
def _corrupt_call(
  images: jax.Array, indices: jax.Array, seed: jax.Array, severity: jax.Array, constants: dict, *, name: str
) -> jax.Array:
  fn = _ON_DEVICE[name][0]
  keys = jax.vmap(lambda index: image_key(seed, name, severity, index))(indices)
  corrupted = jax.vmap(lambda image, key: fn(image, key, **constants))(images.astype(jnp.float32) / 255, keys)
  return (jnp.clip(corrupted, 0, 1) * 255).astype(jnp.uint8)  # Truncates, as np.uint8.


def _run_on_device(name: str, images: np.ndarray, severity: int, seed: int, indices: np.ndarray) -> np.ndarray:
  """Calls of a fixed number of images (the last one padded): one compiled program, whatever the batch."""
  size = images.shape[1]
  constants = jax.tree.map(lambda v: np.asarray(v, np.float32), _ON_DEVICE[name][1](size)[severity - 1])
  per_call = max(1, PIXELS_PER_CALL // size**2)
  calls = []
  for start in range(0, len(images), per_call):
    part, part_indices = images[start : start + per_call], indices[start : start + per_call].astype(np.int32)
    padding = per_call - len(part)
    part, part_indices = np.pad(part, ((0, padding), (0, 0), (0, 0), (0, 0))), np.pad(part_indices, (0, padding))
    calls.append(
      (_corrupt_call(part, part_indices, np.uint32(seed), np.int32(severity), constants, name=name), padding)
    )
  return np.concatenate([np.asarray(out)[: per_call - padding] for out, padding in calls])


# The corruptions, in make_cifar_c.py's order, with its CIFAR constants (severity 1 to 5).


@_on_device(lambda size: [{'sigma': c} for c in (0.04, 0.06, 0.08, 0.09, 0.10)])
def gaussian_noise(x: jax.Array, key: jax.Array, sigma: jax.Array) -> jax.Array:
  return x + sigma * jax.random.normal(key, x.shape)


SHOT_PHOTONS = (500, 250, 100, 75, 50)


@_on_device(
  lambda size: [{'photons': c, 'cdfs': corruption_filters.poisson_cdfs(c, max(SHOT_PHOTONS))} for c in SHOT_PHOTONS]
)
def shot_noise(x: jax.Array, key: jax.Array, photons: jax.Array, cdfs: jax.Array) -> jax.Array:
  levels = jnp.round(x * 255).astype(jnp.int32)
  return corruption_filters.poisson_by_inversion(key, levels, cdfs) / photons


@_on_device(lambda size: [{'amount': c} for c in (0.01, 0.02, 0.03, 0.05, 0.07)])
def impulse_noise(x: jax.Array, key: jax.Array, amount: jax.Array) -> jax.Array:
  flip_key, salt_key = jax.random.split(key)
  salt = jax.random.bernoulli(salt_key, 0.5, x.shape).astype(x.dtype)  # Salt or pepper, equally likely.
  return jnp.where(jax.random.bernoulli(flip_key, amount, x.shape), salt, x)


DEFOCUS_REACH = 2  # Every CIFAR disk kernel fits in 5 x 5.


def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
  """make_cifar_c.py's `disk` for radius <= 8 (all CIFAR radii): the normalised disk on a 17 x 17 grid,
  smoothed by OpenCV's 3 x 3 GaussianBlur; its central 5 x 5, which hold all of it."""
  offsets = np.arange(-8, 9)
  disk = (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2).astype(np.float64)
  taps = np.exp(-((np.arange(3) - 1) ** 2) / (2 * alias_blur**2))  # cv2.getGaussianKernel(3, alias_blur).
  smooth = corruption_filters.filter_matrix(len(offsets), taps / taps.sum(), 'mirror')
  kernel = smooth @ (disk / disk.sum()) @ smooth.T
  centre = slice(8 - DEFOCUS_REACH, 9 + DEFOCUS_REACH)
  assert np.isclose(kernel[centre, centre].sum(), 1), 'the disk reaches beyond the kernel'
  return kernel[centre, centre]


@_on_device(
  lambda size: [{'kernel': disk_kernel(*c)} for c in ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))]
)
def defocus_blur(x: jax.Array, key: jax.Array, kernel: jax.Array) -> jax.Array:
  del key
  size, width = x.shape[0], 2 * DEFOCUS_REACH + 1
  padded = jnp.pad(x, ((DEFOCUS_REACH,) * 2, (DEFOCUS_REACH,) * 2, (0, 0)), mode='reflect')  # BORDER_REFLECT_101.
  return sum(kernel[i, j] * padded[i : i + size, j : j + size] for i in range(width) for j in range(width))


GLASS_PASSES = 2  # The most passes of any severity.


@_on_device(
  lambda size: [
    {
      'blur': corruption_filters.filter_matrix(size, corruption_filters.gaussian_taps(sigma, truncate=4.0), 'nearest'),
      'passes': passes,
    }
    for sigma, passes in ((0.05, 1), (0.25, 1), (0.4, 1), (0.25, 2), (0.4, 2))  # max_delta is 1 in all.
  ]
)
def glass_blur(x: jax.Array, key: jax.Array, blur: jax.Array, passes: jax.Array) -> jax.Array:
  size = x.shape[0]
  x = corruption_filters.truncate_to_levels(corruption_filters.separable(x, blur))
  rows, cols = jnp.meshgrid(jnp.arange(size), jnp.arange(size), indexing='ij')
  moved = (rows >= 2) & (cols >= 2)  # The loop's range(size - 1, 1, -1) in both axes.
  for i in range(GLASS_PASSES):
    col_offsets, row_offsets = jax.random.randint(jax.random.fold_in(key, i), (2, size, size), -1, 1)
    active = moved & (i < passes)
    x = x[jnp.where(active, rows + row_offsets, rows), jnp.where(active, cols + col_offsets, cols)]
  return corruption_filters.separable(x, blur)


@_on_device(
  lambda size: [
    {'weights': corruption_filters.motion_weights(radius, sigma, width=19)}
    for radius, sigma in ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5))
  ]
)
def motion_blur(x: jax.Array, key: jax.Array, weights: jax.Array) -> jax.Array:
  angle = jax.random.uniform(key, minval=-45, maxval=45)
  return jnp.round(corruption_filters.motion_blur_image(x * 255, angle, weights)) / 255  # An 8-bit PNG comes back.


def zoom_stack(size: int, top: float, depth: int) -> dict[str, np.ndarray]:
  """The original's zoom factors np.arange(1, top, 0.01) as `zoom_matrix`es, zeros up to `depth`, and
  the number of images averaged (the clean one too)."""
  matrices = [corruption_filters.zoom_matrix(size, factor) for factor in np.arange(1, top, 0.01)]
  return {'matrices': np.pad(matrices, ((0, depth - len(matrices)), (0, 0), (0, 0))), 'count': len(matrices) + 1}


@_on_device(lambda size: [zoom_stack(size, top, depth=26) for top in (1.06, 1.11, 1.16, 1.21, 1.26)])
def zoom_blur(x: jax.Array, key: jax.Array, matrices: jax.Array, count: jax.Array) -> jax.Array:
  del key
  return (x + jnp.einsum('zij,jkc,zlk->ilc', matrices, x, matrices, precision=corruption_filters.EXACT)) / count


@_on_device(
  lambda size: [
    {
      'loc': loc,
      'scale': scale,
      'zoom': corruption_filters.zoom_matrix(size, zoom),
      'threshold': threshold,
      'weights': corruption_filters.motion_weights(radius, sigma, width=29),
      'kept': kept,
    }
    for loc, scale, zoom, threshold, radius, sigma, kept in (
      (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
      (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
      (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
      (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
      (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    )
  ]
)
def snow(
  x: jax.Array,
  key: jax.Array,
  loc: jax.Array,
  scale: jax.Array,
  zoom: jax.Array,
  threshold: jax.Array,
  weights: jax.Array,
  kept: jax.Array,
) -> jax.Array:
  layer_key, angle_key = jax.random.split(key)
  size = x.shape[0]
  layer = corruption_filters.separable(loc + scale * jax.random.normal(layer_key, (size, size)), zoom)
  layer = corruption_filters.truncate_to_levels(jnp.where(layer < threshold, 0.0, layer))  # An 8-bit greyscale PNG.
  angle = jax.random.uniform(angle_key, minval=-135, maxval=-45)
  layer = jnp.round(corruption_filters.motion_blur_image(layer[..., None] * 255, angle, weights)) / 255
  grey = jnp.dot(x, jnp.array([0.299, 0.587, 0.114]), precision=corruption_filters.EXACT)  # cv2.COLOR_RGB2GRAY.
  x = kept * x + (1 - kept) * jnp.maximum(x, grey[..., None] * 1.5 + 0.5)
  return x + layer + layer[::-1, ::-1]


# Per frost photo of make_cifar_c.py (frost1-5; it never picks frost6), after its 0.2 downscale: the mean
# colour (RGB), the standard deviation within 32 px crops (RGB), and the share of the variance that is
# pixel-scale grain (from the 3 x 3 box-blurred crops' deviation). frost2 and frost3 are the same photo.
FROST_STYLES = (
  ((77.5, 149.0, 165.7), (21.1, 12.9, 12.4), 0.55),
  ((200.8, 205.4, 214.5), (17.3, 17.6, 18.0), 0.71),
  ((200.8, 205.4, 214.5), (17.3, 17.6, 18.0), 0.71),
  ((138.0, 153.2, 165.6), (26.0, 26.1, 27.1), 0.83),
  ((112.3, 123.3, 134.7), (34.9, 34.5, 33.8), 0.74),
)
FROST_CLOUD_DECAY = 2.0  # wibble decay of the fractal that makes the texture's smooth part.


def frost_texture(key: jax.Array, size: int) -> jax.Array:
  """[size, size, 3] pixel values (0-255) standing in for a crop of a random frost photo."""
  style_key, grain_key, cloud_key = jax.random.split(key, 3)
  mean, std, grain = (jnp.array(column, jnp.float32) for column in zip(*FROST_STYLES, strict=True))
  style = jax.random.randint(style_key, (), 0, len(FROST_STYLES))
  cloud = corruption_filters.plasma_fractal(cloud_key, size, FROST_CLOUD_DECAY)
  cloud = (cloud - cloud.mean()) / jnp.maximum(cloud.std(), 1e-6)
  texture = jnp.sqrt(grain[style]) * jax.random.normal(grain_key, (size, size)) + jnp.sqrt(1 - grain[style]) * cloud
  return jnp.clip(mean[style] + std[style] * texture[..., None], 0, 255)


@_on_device(
  lambda size: [
    {'image_weight': a, 'frost_weight': b} for a, b in ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))
  ]
)
def frost(x: jax.Array, key: jax.Array, image_weight: jax.Array, frost_weight: jax.Array) -> jax.Array:
  return (image_weight * x * 255 + frost_weight * frost_texture(key, x.shape[0])) / 255


@_on_device(
  lambda size: [{'strength': a, 'wibble_decay': b} for a, b in ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))]
)
def fog(x: jax.Array, key: jax.Array, strength: jax.Array, wibble_decay: jax.Array) -> jax.Array:
  brightest = x.max()
  fogged = x + strength * corruption_filters.plasma_fractal(key, x.shape[0], wibble_decay)[..., None]
  return fogged * brightest / (brightest + strength)


@_on_device(lambda size: [{'lift': c} for c in (0.05, 0.1, 0.15, 0.2, 0.3)])
def brightness(x: jax.Array, key: jax.Array, lift: jax.Array) -> jax.Array:
  del key
  value = x.max(axis=-1, keepdims=True)  # HSV value; hue and saturation stay.
  brighter = jnp.clip(value + lift, 0, 1)
  return jnp.where(value > 0, x * brighter / jnp.maximum(value, 1e-12), brighter)


@_on_device(lambda size: [{'kept': c} for c in (0.75, 0.5, 0.4, 0.3, 0.15)])
def contrast(x: jax.Array, key: jax.Array, kept: jax.Array) -> jax.Array:
  del key
  means = x.mean(axis=(0, 1), keepdims=True)
  return (x - means) * kept + means


@_on_device(
  lambda size: [  # make_cifar_c.py's IMSIZE (32) is the image size.
    {
      'alpha': size * a,
      'smooth': corruption_filters.filter_matrix(
        size, corruption_filters.gaussian_taps(size * s, truncate=3.0), 'reflect'
      ),
      'shift': size * d,
    }
    for a, s, d in ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03))
  ]
)
def elastic_transform(x: jax.Array, key: jax.Array, alpha: jax.Array, smooth: jax.Array, shift: jax.Array) -> jax.Array:
  size = x.shape[0]
  affine_key, col_key, row_key = jax.random.split(key, 3)
  centre, reach = size // 2, size // 3
  corners = np.array([[centre + reach] * 2, [centre + reach, centre - reach], [centre - reach] * 2], np.float32)
  moved = corners + jax.random.uniform(affine_key, corners.shape, minval=-shift, maxval=shift)
  # cv2.warpAffine samples the source at the inverse of the map taking `corners` (x, y) to `moved`.
  inverse = jnp.linalg.solve(jnp.concatenate([moved, jnp.ones((3, 1))], axis=1), corners)
  rows, cols = jnp.meshgrid(jnp.arange(size, dtype=jnp.float32), jnp.arange(size, dtype=jnp.float32), indexing='ij')
  source = jnp.dot(jnp.stack([cols, rows, jnp.ones_like(rows)], axis=-1), inverse, precision=corruption_filters.EXACT)
  warped = corruption_filters.sample(x, source[..., 1], source[..., 0], 'mirror')  # BORDER_REFLECT_101.
  displacement = lambda k: (
    alpha * corruption_filters.separable(jax.random.uniform(k, (size, size), minval=-1, maxval=1), smooth)
  )
  return corruption_filters.sample(warped, rows + displacement(row_key), cols + displacement(col_key), 'reflect')


def _each_image(images: np.ndarray, fn: Callable[[Image.Image], Image.Image]) -> np.ndarray:
  return np.stack([np.asarray(fn(Image.fromarray(image)).convert('RGB')) for image in images])


@_on_host
def pixelate(images: np.ndarray, severity: int) -> np.ndarray:
  factor = (0.95, 0.9, 0.85, 0.75, 0.65)[severity - 1]
  size = images.shape[1]
  small = int(size * factor)
  return _each_image(
    images, lambda image: image.resize((small, small), Image.Resampling.BOX).resize((size, size), Image.Resampling.BOX)
  )


@_on_host
def jpeg_compression(images: np.ndarray, severity: int) -> np.ndarray:
  quality = (80, 65, 58, 50, 40)[severity - 1]

  def compressed(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, 'JPEG', quality=quality)
    return Image.open(buffer)

  return _each_image(images, compressed)
