"""What chooses: the validation split picks the best checkpoint and stops training early; the test
split is only reported, and without a validation split 'best' is the final checkpoint."""

import itertools
import logging
import math

import jax
import pytest

from configs import smoke
from resnet_flax import data, evaluate
from resnet_flax.data import input_pipeline
from resnet_flax.errors import ConfigError
from resnet_flax.run import writers
from resnet_flax.train import step, trainer

STEPS_PER_EPOCH = 6  # (512 - 128 held out) // 64.


def validated_config(epochs: int, **fields):
  config = smoke.get_config()
  config.data.validation_size = 128
  config.num_epochs = float(epochs)
  config.keep_checkpoints = epochs + 1  # Every evaluated checkpoint stays, to be compared.
  config.update(fields)
  return config


def test_best_is_chosen_by_validation_even_where_test_disagrees(tmp_path, monkeypatch):
  """The validation accuracy is made to be 1 - test accuracy: the checkpoint kept as best must then be
  the one with the *worst* test accuracy, and the report must say the validation split chose it."""
  config = validated_config(epochs=4)
  test_batches = list(input_pipeline.padded_batches(data.load_splits(config.data)['test'], config.eval_batch_size))
  test_accuracy, compute = {}, step.compute_eval_metrics

  def inverted_validation(eval_fn, state, batches):
    measured = compute(eval_fn, state, test_batches)
    test_accuracy[int(jax.device_get(state.step))] = measured['accuracy']
    return {**measured, 'accuracy': 1 - measured['accuracy']}

  monkeypatch.setattr(trainer, 'compute_eval_metrics', inverted_validation)
  trainer.train_and_evaluate(config, str(tmp_path))
  monkeypatch.undo()

  assert sorted(test_accuracy) == [6, 12, 18, 24]
  worst_on_test = min(test_accuracy.values())
  assert worst_on_test < max(test_accuracy.values())  # They do disagree.
  report = evaluate.evaluate_checkpoint(config, str(tmp_path))
  assert test_accuracy[report['checkpoint_step']] == worst_on_test  # Two steps may tie.
  assert report['accuracy'] == pytest.approx(worst_on_test, abs=1e-6)
  assert report['checkpoint_chosen_by'].startswith('validation accuracy, on the validation split of 128')


def test_without_validation_best_is_the_final_checkpoint(straight_run):
  config = smoke.get_config()
  report = evaluate.evaluate_checkpoint(config, str(straight_run))
  assert report['checkpoint_step'] == max(int(p.name) for p in (straight_run / 'checkpoints').glob('[0-9]*'))
  assert 'no validation split, so best is the final checkpoint' in report['checkpoint_chosen_by']


def test_early_stopping_ends_with_a_checkpoint_and_says_why(tmp_path, monkeypatch, caplog):
  config = validated_config(epochs=6, early_stopping_patience=2)
  scripted = itertools.chain([0.5, 0.6, 0.55, 0.58], itertools.repeat(0.9))  # Best at the 2nd evaluation.
  monkeypatch.setattr(trainer, 'compute_eval_metrics', lambda *args: {'accuracy': next(scripted), 'loss': 1.0})
  with caplog.at_level(logging.INFO):
    trainer.train_and_evaluate(config, str(tmp_path))
  stopped_at = 4 * STEPS_PER_EPOCH
  assert f'early stopping at step {stopped_at}: no better validation accuracy than 0.6000 (step 12)' in caplog.text
  assert max(int(p.name) for p in (tmp_path / 'checkpoints').glob('[0-9]*')) == stopped_at

  caplog.clear()
  with caplog.at_level(logging.INFO):
    assert trainer.train_and_evaluate(config, str(tmp_path)) == {}  # Rerunning the command does not train on.
  assert f'Training already ended, early stopping at step {stopped_at}' in caplog.text


def early_stop(evaluations: list[tuple[int, float]], patience: int) -> tuple[int, int, float] | None:
  """(step, best step, best accuracy) of the evaluation where `patience` evaluations have passed without a better
  accuracy than the best before them, or None."""
  best_step, best = 0, -math.inf
  for at, accuracy in evaluations:
    if accuracy > best:
      best_step, best = at, accuracy
    if (at - best_step) // STEPS_PER_EPOCH >= patience:
      return at, best_step, best
  return None


@pytest.mark.slow
def test_a_real_validation_split_stops_training_where_its_accuracies_say(tmp_path, caplog):
  """Nothing scripted: the validation accuracy of the smoke data reaches its ceiling (1.0 at the 4th of 10 epochs,
  measured) and the run ends `patience` evaluations after its best, as the accuracies it recorded say."""
  config = validated_config(epochs=10, early_stopping_patience=2)
  with caplog.at_level(logging.INFO):
    trainer.train_and_evaluate(config, str(tmp_path))
  evaluations = writers.read_scalars(str(tmp_path))['eval_accuracy']
  assert all(accuracy * 128 == round(accuracy * 128) for _, accuracy in evaluations)  # Of the 128 held out.
  stop = early_stop(evaluations, patience=2)
  assert stop and stop[0] < 10 * STEPS_PER_EPOCH, evaluations  # It stopped early ...
  stopped_at, best_step, best = stop
  assert evaluations[-1][0] == stopped_at  # ... at that evaluation, not later.
  assert f'early stopping at step {stopped_at}: no better validation accuracy than {best:.4f} (step {best_step})' in (
    caplog.text
  )
  assert max(int(p.name) for p in (tmp_path / 'checkpoints').glob('[0-9]*')) == stopped_at


def test_early_stopping_needs_a_validation_split(tmp_path):
  config = smoke.get_config()
  config.early_stopping_patience = 3
  with pytest.raises(ConfigError, match='early_stopping_patience=3 needs a validation split, never the test split'):
    trainer.train_and_evaluate(config, str(tmp_path))
