"""The building blocks of the CIFAR-10-C corruptions (`corruption_ops`): linear operators along one image
axis (correlation with a kernel, Gaussian taps, scipy.ndimage.zoom's interpolation) built in numpy (float64)
from the original's definitions, bilinear sampling, ImageMagick's motion blur, make_cifar_c.py's plasma fractal
and Poisson draws by inversion.

Written here rather than called from the original's libraries (scipy.ndimage, OpenCV, ImageMagick through Wand,
scikit-image), which do not run inside a jitted JAX program; how each differs from the library it replaces is in
`corruption_ops`' docstring. Matrix products run at full float32 precision (`EXACT`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

EXACT = jax.lax.Precision.HIGHEST  # float32 products on GPUs and TPUs too (not TF32 or bfloat16 passes).


# Linear operators along one image axis, built in numpy (float64) from the original's definitions.

BOUNDARIES: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
  'nearest': lambda i, n: np.clip(i, 0, n - 1),  # aaa|abcd|ddd (scipy 'nearest', skimage's gaussian)
  'reflect': lambda i, n: np.where(i % (2 * n) < n, i % (2 * n), 2 * n - 1 - i % (2 * n)),  # ba|abcd|dc
  'mirror': lambda i, n: np.where(i % (2 * n - 2) < n, i % (2 * n - 2), 2 * n - 2 - i % (2 * n - 2)),  # cb|abcd|cb
}


def filter_matrix(size: int, taps: np.ndarray, boundary: str) -> np.ndarray:
  """[size, size]: correlation with the centred odd-length `taps`, the image continued as `boundary` says."""
  radius, rows = len(taps) // 2, np.arange(size)
  matrix = np.zeros((size, size))
  for offset, tap in zip(range(-radius, radius + 1), taps, strict=True):
    np.add.at(matrix, (rows, BOUNDARIES[boundary](rows + offset, size)), tap)
  return matrix


def gaussian_taps(sigma: float, truncate: float) -> np.ndarray:
  """scipy.ndimage.gaussian_filter1d's weights (skimage.filters.gaussian's): radius int(truncate sigma + 0.5)."""
  if sigma <= 0:
    return np.ones(1)  # scipy skips an axis of sigma 0.
  reach = int(truncate * sigma + 0.5)
  taps = np.exp(-0.5 * (np.arange(-reach, reach + 1) / sigma) ** 2)
  return taps / taps.sum()


def zoom_matrix(size: int, factor: float) -> np.ndarray:
  """make_cifar_c.py's `clipped_zoom` along one axis: the central ceil(size / factor) pixels scaled by
  `factor` with scipy.ndimage.zoom (order 1, corners aligned), of which the central `size` are kept."""
  crop = math.ceil(size / factor)
  zoomed = round(crop * factor)  # scipy's output size.
  coords = (size - crop) // 2 + ((zoomed - size) // 2 + np.arange(size)) * (crop - 1) / (zoomed - 1)
  lower = np.floor(coords).astype(int)
  matrix = np.zeros((size, size))
  np.add.at(matrix, (np.arange(size), lower), 1 - (coords - lower))
  np.add.at(matrix, (np.arange(size), np.minimum(lower + 1, size - 1)), coords - lower)
  return matrix


def separable(image: jax.Array, matrix: jax.Array) -> jax.Array:
  """`matrix` applied down the columns and along the rows of [S, S, ...] `image`."""
  return jnp.einsum('ij,jk...,lk->il...', matrix, image, matrix, precision=EXACT)


def truncate_to_levels(image: jax.Array) -> jax.Array:
  """What the original's `np.uint8(image * 255) / 255` leaves of an image in [0, 1]."""
  return jnp.floor(jnp.clip(image, 0, 1) * 255) / 255


def sample(image: jax.Array, rows: jax.Array, cols: jax.Array, boundary: str) -> jax.Array:
  """Bilinear samples of each channel of [S, S, C] `image` at (rows, cols), continued as `boundary` says."""
  at = lambda channel: jax.scipy.ndimage.map_coordinates(channel, [rows, cols], order=1, mode=boundary)
  return jax.vmap(at, in_axes=2, out_axes=2)(image)


def motion_weights(radius: float, sigma: float, width: int) -> np.ndarray:
  """ImageMagick's motion blur kernel: a half-Gaussian over 2 ceil(radius) + 1 steps, zeros up to `width`."""
  steps = np.arange(2 * math.ceil(radius) + 1)  # GetOptimalKernelWidth1D.
  weights = np.exp(-(steps**2) / (2 * sigma**2))
  return np.pad(weights / weights.sum(), (0, width - len(steps)))


def motion_blur_image(image: jax.Array, angle: jax.Array, weights: jax.Array) -> jax.Array:
  """ImageMagick's MotionBlurImage of [S, S, C] `image`: step i of `weights` samples the pixel at
  (ceil(i cos a - 1/2), ceil(i sin a - 1/2)) columns and rows away, edge pixels standing in for those outside."""
  steps = jnp.arange(len(weights))
  radians = jnp.deg2rad(angle)
  col_offsets = jnp.ceil(steps * jnp.cos(radians) - 0.5).astype(jnp.int32)
  row_offsets = jnp.ceil(steps * jnp.sin(radians) - 0.5).astype(jnp.int32)
  grid, last = jnp.arange(image.shape[0]), image.shape[0] - 1
  blurred = jnp.zeros_like(image)
  for i in range(len(weights)):
    rows, cols = jnp.clip(grid + row_offsets[i], 0, last), jnp.clip(grid + col_offsets[i], 0, last)
    blurred = blurred + weights[i] * image[rows][:, cols]
  return blurred


def plasma_fractal(key: jax.Array, size: int, wibble_decay: jax.Array) -> jax.Array:
  """make_cifar_c.py's diamond-square height map in [0, 1], on the next power of two >= size, cropped.

  Each level doubles the grid: the corners it has, the squares' centres and the two diamond points
  between them, interleaved (the original writes them into strided slices of the final map). Every new
  point is the mean of its 4 neighbours (on a torus) plus wibble times uniform(-wibble, wibble), the
  original's `wibbledmean`; the uniforms are drawn at once (many small draws compile for seconds).
  """
  levels = (size - 1).bit_length()
  draws = jax.random.uniform(key, (3, (4**levels - 1) // 3), minval=-1, maxval=1)  # 3 n^2 per level of n^2 corners.
  corners, wibble, used = jnp.zeros((1, 1)), 100.0, 0
  for _ in range(levels):
    n = len(corners)
    centre_noise, left_noise, top_noise = wibble**2 * draws[:, used : used + n * n].reshape(3, n, n)
    sums = corners + jnp.roll(corners, -1, axis=0)
    centres = (sums + jnp.roll(sums, -1, axis=1)) / 4 + centre_noise
    left = (centres + jnp.roll(centres, 1, axis=0) + corners + jnp.roll(corners, -1, axis=1)) / 4 + left_noise
    top = (centres + jnp.roll(centres, 1, axis=1) + corners + jnp.roll(corners, -1, axis=0)) / 4 + top_noise
    even_rows = jnp.stack([corners, left], axis=-1).reshape(n, 2 * n)
    odd_rows = jnp.stack([top, centres], axis=-1).reshape(n, 2 * n)
    corners = jnp.stack([even_rows, odd_rows], axis=1).reshape(2 * n, 2 * n)
    wibble, used = wibble / wibble_decay, used + n * n
  corners = corners - corners.min()
  return (corners / corners.max())[:size, :size]


def poisson_cdfs(rate: float, max_rate: float) -> np.ndarray:
  """[256, K]: the CDF of Poisson(rate level / 255) for each 8-bit level at counts 0 to K - 1, K reaching
  13 standard deviations past `max_rate` (its last column is 1: every draw of `poisson_by_inversion` ends)."""
  counts = np.arange(math.ceil(max_rate + 13 * math.sqrt(max_rate) + 13))
  means = rate * np.arange(256)[:, None] / 255
  log_factorials = np.concatenate([[0.0], np.cumsum(np.log(counts[1:]))])
  with np.errstate(divide='ignore', invalid='ignore'):
    pmf = np.where(means > 0, np.exp(counts * np.log(means) - means - log_factorials), counts == 0)
  cdf = np.cumsum(pmf, axis=1)
  cdf[:, -1] = 1.0
  return cdf


def poisson_by_inversion(key: jax.Array, levels: jax.Array, cdfs: jax.Array) -> jax.Array:
  """Poisson counts for integer `levels` (rows of `cdfs`): the smallest count whose CDF exceeds a uniform
  draw, found by bisection (exact, and unlike jax.random.poisson's rejection loop, fast on a CPU)."""
  uniform = jax.random.uniform(key, levels.shape)
  lower, upper = jnp.zeros_like(levels), jnp.full_like(levels, cdfs.shape[1] - 1)
  for _ in range(math.ceil(math.log2(cdfs.shape[1]))):
    middle = (lower + upper) // 2
    above = cdfs[levels, middle] > uniform
    lower, upper = jnp.where(above, lower, middle + 1), jnp.where(above, middle, upper)
  return lower
