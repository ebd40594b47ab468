"""docs/development.md: every block is a config file that works as written, and adds its entry in under 20 lines.

Each block runs as a module (what `main.py --config=<file>` does with a config file); its entry is used the
way the page says, on a two-step run of synthetic data, and removed from its registry afterwards.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from resnet_flax import evaluate, models, optim, step_extensions
from resnet_flax.data import augment
from resnet_flax.evaluate import evaluators
from resnet_flax.train import config_checks, trainer

PAGE = Path(__file__).resolve().parents[1] / 'docs' / 'development.md'
BLOCKS = re.findall(r'```python\n(.*?)```', PAGE.read_text(), re.S)
REGISTRIES = (models.PRESETS, augment.OPS, optim.OPTIMIZERS, step_extensions.REGISTRY, evaluators.EVALUATORS)


def config_file(section: int, directory: Path) -> types.ModuleType:
  """The block of section `section` written to a file and imported, as main.py's --config imports one."""
  path = directory / f'development_docs_{section}.py'
  path.write_text(BLOCKS[section])
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[path.stem] = module
  spec.loader.exec_module(module)
  return module


@pytest.fixture
def restore_registries():
  """Whatever a block registers is gone after the test."""
  saved = [dict(registry) for registry in REGISTRIES]
  yield
  for registry, before in zip(REGISTRIES, saved, strict=True):
    registry.clear()
    registry.update(before)


def two_steps(config):
  config.data.synthetic_train_size, config.num_epochs = 128, 1.0
  return config


def test_the_page_has_five_additions_each_under_20_lines():
  assert len(BLOCKS) == 5
  for block in BLOCKS:
    addition = block.split('\ndef get_config')[0]
    assert len([line for line in addition.splitlines() if line.strip()]) < 20, addition


def set_up_and_train(section: int, tmp_path: Path) -> trainer.Setup:
  """The set-up of section `section`'s config (two steps), after a run of it trained with finite metrics."""
  config = two_steps(config_file(section, tmp_path).get_config())
  config_checks.validate(config)
  metrics = trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  assert metrics and all(np.isfinite(value) for value in metrics.values())
  return trainer.set_up(config, str(tmp_path / 'run'))


def test_the_model_of_the_page_is_the_one_trained(restore_registries, tmp_path):
  setup = set_up_and_train(0, tmp_path)
  assert models.count_params(setup.variables['params']) == models.preset_param_count('resnet10_slim')


def test_the_augmentation_op_of_the_page_inverts_when_its_coin_says_so(restore_registries, tmp_path):
  set_up_and_train(1, tmp_path)
  image = np.arange(27, dtype=np.uint8).reshape(3, 3, 3)
  np.testing.assert_array_equal(augment.OPS['invert'].fn(jax.random.key(0), image, None, prob=1.0), 255 - image)
  np.testing.assert_array_equal(augment.OPS['invert'].fn(jax.random.key(0), image, None, prob=0.0), image)


def test_the_optimizer_of_the_page_is_lion(restore_registries, tmp_path):
  setup = set_up_and_train(2, tmp_path)
  assert 'ScaleByLionState' in str(jax.tree.structure(setup.state.opt_state))


def test_the_step_extension_of_the_page_is_active(restore_registries, tmp_path):
  setup = set_up_and_train(3, tmp_path)
  assert [extension.name for extension in setup.spec.extensions] == ['logit_penalty']
  assert setup.spec.arguments() == {'logit_penalty': {'weight': np.float32(0.05)}}


def test_the_evaluator_of_the_page_writes_its_section(restore_registries, straight_run, tmp_path):
  config = config_file(4, tmp_path).get_config()
  workdir = tmp_path / 'run'
  shutil.copytree(straight_run, workdir)
  report = evaluate.evaluate_checkpoint(config, str(workdir))
  written = json.loads(next(workdir.glob('eval/*/report.json')).read_text())
  assert written['confidence'] == report['confidence']
  probabilities = np.load(next(workdir.glob('eval/*/predictions.npz')))['probabilities']
  assert report['confidence']['mean_confidence'] == pytest.approx(probabilities.max(axis=1).mean(), rel=1e-5)
