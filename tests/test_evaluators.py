"""Evaluators chosen by config: one registered here, from the test file, writes its section into report.json."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from configs import smoke
from resnet_flax import evaluate
from resnet_flax.errors import ConfigError
from resnet_flax.evaluate import evaluators, inference

from helpers import indexed_report_dir

NAME = 'confidence'


def confidence_section(context: evaluators.EvalContext) -> dict:
  """The mean top softmax probability of the plain forward pass, and the test images of each class."""
  logits = inference.forward(context.restored, context.split, context.config.eval_batch_size, 'none', context.mesh)
  logits = logits['logits'].astype(np.float64)
  probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
  probabilities /= probabilities.sum(axis=1, keepdims=True)
  counts = np.bincount(context.split.labels, minlength=len(context.split.class_names))
  return {
    'mean_confidence': float(probabilities.max(axis=1).mean()),
    'class_counts': dict(zip(context.split.class_names, counts.tolist(), strict=True)),
  }


def plot_confidence(section: dict, title: str, directory: str):
  figure = Figure()
  figure.subplots().bar(list(section['class_counts']), list(section['class_counts'].values()))
  figure.suptitle(title)
  figure.savefig(Path(directory) / 'confidence.png')


@pytest.fixture
def confidence_evaluator():
  evaluators.register(NAME, plot=plot_confidence)(confidence_section)
  try:
    yield
  finally:
    del evaluators.EVALUATORS[NAME]


def test_a_registered_evaluator_runs_through_the_config_and_writes_its_section(
  confidence_evaluator, straight_run, tmp_path
):
  workdir = tmp_path / 'run'
  shutil.copytree(straight_run, workdir, ignore=shutil.ignore_patterns('eval'))
  config = smoke.get_config()
  config.eval.evaluators = NAME
  report = evaluate.evaluate_checkpoint(config, str(workdir))
  directory = indexed_report_dir(workdir, config.data, NAME)  # Labelled by its name.
  section = json.loads((directory / 'report.json').read_text())[NAME]
  assert section == report[NAME]
  predictions = np.load(directory / evaluate.PREDICTIONS_FILE)  # The core forward pass's, saved apart.
  assert section['mean_confidence'] == pytest.approx(predictions['probabilities'].max(axis=1).mean(), rel=1e-6)
  names = report['predicted_class_names']  # The model's: predictions.npz labels index them.
  assert section['class_counts'] == {name: int(np.sum(predictions['label'] == i)) for i, name in enumerate(names)}
  assert sum(section['class_counts'].values()) == report['num_examples']
  assert (directory / 'confidence.png').read_bytes()[:4] == b'\x89PNG'
  assert not {'adversarial', 'corruptions'} & set(report)  # Only what the config chose.


def test_an_unknown_evaluator_is_refused_in_one_line_before_any_work(tmp_path):
  config = smoke.get_config()
  config.eval.evaluators = 'adversarial,calibration'
  message = (
    "--config.eval.evaluators='adversarial,calibration' is invalid: unknown evaluator calibration: "
    'the registered ones are adversarial, corruptions'
  )
  with pytest.raises(ConfigError) as error:
    evaluate.evaluate_checkpoint(config, str(tmp_path))  # No checkpoint there: refused before looking.
  assert str(error.value) == message
  assert evaluators.check_names(('adversarial',)).startswith("must be a string: '' (none) or comma-separated")


@pytest.mark.parametrize(
  'value, message',
  [
    ('adversarial', 'names adversarial, which measures what --config.eval.attacks chooses: set that field'),
    ('corruptions', 'names corruptions, which measures what --config.eval.corruptions chooses: set that field'),
    (f'{NAME}, {NAME}', f'{NAME} named more than once'),
  ],
)
def test_a_bad_choice_of_evaluators_is_one_line(confidence_evaluator, value, message):
  config = smoke.get_config()
  config.eval.evaluators = value
  with pytest.raises(ConfigError, match=message) as error:
    evaluators.check_config(config)
  assert '\n' not in str(error.value)


def test_the_built_in_evaluators_are_switched_on_by_their_fields_in_report_order(confidence_evaluator):
  config = smoke.get_config()
  assert list(evaluators.active(config)) == []
  config.eval.corruptions, config.eval.attacks, config.eval.evaluators = 'fog', ('fgsm',), f'{NAME},corruptions'
  assert list(evaluators.active(config)) == ['adversarial', 'corruptions', NAME]
