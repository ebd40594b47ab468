"""Shared fixtures (helpers that are not fixtures live in helpers.py)."""

import subprocess
from pathlib import Path

import jax
import pytest

from helpers import COMPILATION_CACHE, run_smoke

# In-process runs share compiled programs too (the smoke runs of many tests compile the same steps).
jax.config.update('jax_compilation_cache_dir', str(COMPILATION_CACHE))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / 'shared' / 'data'


@pytest.fixture(scope='session')
def cifar10_jpeg_dir(tmp_path_factory) -> Path:
  """The real CIFAR-10 JPEGs, unpacked once per session: `<dir>/{train,test}/<class>/*.jpg`."""
  archive = SHARED_DATA / 'cifar10-jpeg.tar.gz'
  if not archive.is_file():
    pytest.skip('../shared/data/cifar10-jpeg.tar.gz not found (real CIFAR-10 JPEGs live only in the project workplace)')
  destination = tmp_path_factory.mktemp('cifar10_jpeg')
  subprocess.run(['tar', 'xzf', str(archive), '-C', str(destination)], check=True)  # 8x faster than tarfile.
  return destination / 'cifar10-jpeg'


@pytest.fixture(scope='session')
def straight_run(tmp_path_factory):
  """An uninterrupted smoke run on one device, shared by the tests that compare with it."""
  workdir = tmp_path_factory.mktemp('straight')
  returncode, output = run_smoke(workdir)
  assert returncode == 0, output
  return workdir
