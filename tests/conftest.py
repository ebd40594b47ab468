"""Shared fixtures (helpers that are not fixtures live in helpers.py)."""

import shutil
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest
from absl import logging

import resnet_flax
from configs import smoke
from resnet_flax.deploy import export
from resnet_flax.evaluate import inference

from helpers import COMPILATION_CACHE, read_class_folders, run_smoke, train_tiny

# In-process runs share compiled programs too (the smoke runs of many tests compile the same steps).
jax.config.update('jax_compilation_cache_dir', str(COMPILATION_CACHE))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
# In-process code logs INFO as main.py does, whatever test ran before in this worker (caplog reads it).
logging.set_verbosity(logging.INFO)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / 'shared' / 'data'
CIFAR_TRAIN_PER_CLASS, CIFAR_TRAIN_STEPS = 500, 300


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
def cifar_tiny(cifar10_jpeg_dir):
  """resnet_tiny trained briefly on real CIFAR-10 JPEGs (`trained.Restored`): 300 batches of 64 from the first 500
  training images of each class (44.5% on the first 20 test images of each class). For the slow tests that need a
  model of natural images."""
  images, labels, names = read_class_folders(cifar10_jpeg_dir / 'train', CIFAR_TRAIN_PER_CLASS)
  order = np.random.default_rng(0).permutation(len(images))
  return train_tiny(images[order], labels[order], names, CIFAR_TRAIN_STEPS, batch_size=64)


@pytest.fixture(scope='session')
def straight_run(tmp_path_factory):
  """An uninterrupted smoke run on one device, shared by the tests that compare with it."""
  workdir = tmp_path_factory.mktemp('straight')
  returncode, output = run_smoke(workdir)
  assert returncode == 0, output
  return workdir


@pytest.fixture(scope='session')
def exported(straight_run, tmp_path_factory):
  """(workdir, model card, the JAX model, test images) of a copy of the smoke run exported in every format; shared by
  the tests of the export and of the server."""
  workdir = tmp_path_factory.mktemp('export') / 'run'
  shutil.copytree(straight_run, workdir)
  card = export.run_export(smoke.get_config(), str(workdir), command='the command')
  model = resnet_flax.load(str(workdir))
  return workdir, card, model, inference.load_test_split(smoke.get_config().data, model.restored.run.info).images
