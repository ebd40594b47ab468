"""A user's own photos: `configs/photos.py` on a folder of JPEGs of varied sizes, and the note on the CIFAR stem."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from PIL import Image

from configs import photos, resnet18
from resnet_flax import models
from resnet_flax.run.workdir import Steps
from resnet_flax.train import config_checks

from helpers import run_command

CLASSES = ('apple', 'boat', 'cloud')


def model_config(name: str):
  config = resnet18.get_config()
  config.model.name = name
  return config


@pytest.mark.parametrize(
  'config, side, expected',
  [
    (resnet18.get_config(), 128, '16x the compute'),
    (resnet18.get_config(), 96, '9x the compute'),
    (resnet18.get_config(), 64, None),  # Small images: no note.
    (photos.get_config(), 128, None),  # The stem was chosen.
    (model_config('densenet_bc100_k12'), 128, None),  # No stem to choose.
  ],
  ids=['resnet18_128', 'resnet18_96', 'resnet18_64', 'photos', 'densenet'],
)
def test_the_cifar_stem_on_large_images_is_named_with_its_cost_and_its_fix(config, side, expected):
  note = models.stem_cost_note(config, side)
  if expected is None:
    assert note is None
  else:
    assert expected in note and '--config.model.stem=imagenet' in note


def test_the_photos_recipe_takes_its_folder_after_a_colon_and_fits_a_small_split():
  config = photos.get_config('/data/my_photos')
  assert (config.data.source, config.data.path, config.model.stem) == ('folder', '/data/my_photos', 'imagenet')
  config_checks.validate(config)
  steps = Steps.of(config, 3 * 40)  # 120 photos: one step an epoch.
  assert steps.at_epoch(config.optim.warmup_epochs) < steps.total


def photo_folder(root, per_class: dict[str, int], seed: int = 0) -> None:
  """JPEGs of random sizes from 160 to 640 pixels a side, a colour per class under noise."""
  rng = np.random.default_rng(seed)
  for split, count in per_class.items():
    for index, name in enumerate(CLASSES):
      (root / split / name).mkdir(parents=True)
      for i in range(count):
        height, width = rng.integers(160, 641, size=2)
        colour = np.array([255 * (index == c) for c in range(3)], np.float32)
        pixels = np.clip(0.6 * colour + rng.normal(64, 40, (height, width, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / split / name / f'{i}.jpg', quality=85)


@pytest.mark.slow
def test_the_photos_recipe_trains_on_photos_and_predicts_a_phone_photo(tmp_path):
  photo_folder(tmp_path / 'photos', {'train': 22, 'test': 6})  # 66 photos: one batch of 64.
  workdir = tmp_path / 'run'
  photos_main = [sys.executable, 'main.py', f'--config=configs/photos.py:{tmp_path / "photos"}', f'--workdir={workdir}']
  returncode, output = run_command(photos_main, devices=1, wait=True)  # The recipe as it is: no other flag.
  assert returncode == 0, output
  assert 'keeps its CIFAR stem' not in output
  phone = tmp_path / 'phone.jpg'
  Image.fromarray(np.full((3024, 4032, 3), (200, 30, 30), np.uint8)).save(phone, quality=90)
  returncode, output = run_command([*photos_main, '--mode=predict', f'--predict_paths={phone}'], devices=1, wait=True)
  assert returncode == 0, output
  [prediction] = json.loads((workdir / 'predictions.json').read_text())['predictions']
  assert prediction['top_k'][0]['class'] in CLASSES
