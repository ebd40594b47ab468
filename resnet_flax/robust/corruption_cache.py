"""The cache of generated CIFAR-10-C images: `load_or_corrupt` keeps the result of `corruption_ops.corrupt` as a
uint8 .npy file named by a fingerprint of the clean images, their indices, the seed, the corruption, the severity
and `corruption_ops.GENERATOR_VERSION` (bump it when an output changes) and the backend, written under a
temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

import jax
import numpy as np
from absl import logging

from resnet_flax.robust import corruption_ops


def fingerprint(images: np.ndarray, indices: np.ndarray) -> str:
  """sha256 of the clean images and their indices (what their corruptions are drawn from)."""
  digest = hashlib.sha256(repr((images.shape, str(images.dtype))).encode())
  digest.update(np.ascontiguousarray(images).tobytes())
  digest.update(np.asarray(indices, np.int64).tobytes())
  return digest.hexdigest()


def cache_path(cache_dir: str, images_fingerprint: str, name: str, severity: int, seed: int) -> str:
  """The file of one setting; the backend is part of its key, since CPUs and GPUs may round a pixel apart."""
  identity = json.dumps(
    [images_fingerprint, name, severity, seed, corruption_ops.GENERATOR_VERSION, jax.default_backend()]
  )
  key = hashlib.sha256(identity.encode()).hexdigest()[:20]
  return os.path.join(os.path.expanduser(cache_dir), f'{name}-{severity}-{key}.npy')


def load_or_corrupt(
  images: np.ndarray,
  name: str,
  severity: int,
  seed: int,
  cache_dir: str,
  indices: np.ndarray | None = None,
  images_fingerprint: str | None = None,
) -> np.ndarray:
  """`corruption_ops.corrupt`, from `cache_dir` when it was made before (an unreadable file is made again); ''
  caches nothing.

  `images_fingerprint` (`fingerprint(images, indices)`) saves hashing the images once per setting.
  """
  indices = np.arange(len(images)) if indices is None else np.asarray(indices)
  if not cache_dir:
    return corruption_ops.corrupt(images, name, severity, seed, indices)
  path = cache_path(cache_dir, images_fingerprint or fingerprint(images, indices), name, severity, seed)
  try:
    cached = np.load(path)
    if cached.shape == images.shape and cached.dtype == np.uint8:
      return cached
    logging.warning('Ignoring %s: it holds %s %s, not %s uint8', path, cached.dtype, cached.shape, images.shape)
  except FileNotFoundError:
    pass
  except (OSError, ValueError) as e:
    logging.warning('Ignoring the unreadable cache file %s (%s); making it again', path, e)
  corrupted = corruption_ops.corrupt(images, name, severity, seed, indices)
  try:
    write_atomically(path, corrupted)
  except OSError as e:
    logging.warning('Not caching %s (%s): set --config.eval.corruption_cache_dir to a writable folder', path, e)
  return corrupted


def write_atomically(path: str, array: np.ndarray):
  """Writes a .npy under a temporary name and renames it: a killed run never leaves a partial file."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.tmp')
  try:
    with os.fdopen(handle, 'wb') as f:
      np.save(f, array)
    os.replace(temporary, path)
  except BaseException:
    os.unlink(temporary)
    raise
