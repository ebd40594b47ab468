"""Short runs: a warmup as long as the run is clipped and says so, metrics are logged often enough to draw,
and a series of a few points is drawn with markers (a single point draws no line)."""

from __future__ import annotations

import logging

import matplotlib.lines
import numpy as np
import pytest
from matplotlib.figure import Figure

from configs import default, resnet18
from resnet_flax import optim
from resnet_flax.run import curves, writers
from resnet_flax.run.workdir import LOG_POINTS, Steps


def steps_of(num_examples: int, **fields) -> Steps:
  config = default.get_config()
  config.update_from_flattened_dict(fields)
  return Steps.of(config, num_examples)


def test_a_warmup_as_long_as_the_run_is_clipped_with_a_warning(caplog):
  config = resnet18.get_config()  # A warmup of 2 epochs.
  config.num_epochs, config.batch_size = 1.0, 64
  steps = Steps.of(config, 640)  # 10 steps.
  with caplog.at_level(logging.WARNING):
    rates = [float(optim.create_learning_rate_fn(config.optim, steps)(step)) for step in range(steps.total)]
  clipped = int(optim.WARMUP_CLIP_FRACTION * steps.total)
  assert rates[clipped] == pytest.approx(config.optim.learning_rate)  # The peak, then the decay.
  assert np.all(np.diff(rates[clipped:]) < 0) and np.all(np.diff(rates[: clipped + 1]) > 0)
  assert 'optim.warmup_epochs=2 is as long as the whole run (10 steps)' in caplog.text
  assert 'transition_steps' not in caplog.text  # No optax warning of a schedule of no steps.


def test_a_run_of_one_step_has_no_warmup_and_no_optax_warning(caplog):
  config = resnet18.get_config()
  config.num_epochs, config.batch_size = 1.0, 64
  with caplog.at_level(logging.WARNING):
    schedule = optim.create_learning_rate_fn(config.optim, Steps.of(config, 64))
  assert float(schedule(0)) == pytest.approx(config.optim.learning_rate)
  assert 'transition_steps' not in caplog.text


@pytest.mark.parametrize('num_examples', [64 * 45, 64 * 585, 64 * 20_000])
def test_the_default_logs_about_fifty_points_a_run(num_examples):
  steps = steps_of(num_examples, batch_size=64)
  assert LOG_POINTS <= steps.total // steps.log_every < 2 * LOG_POINTS or steps.log_every == 1


def test_log_every_steps_set_is_kept():
  assert steps_of(64 * 585, batch_size=64, log_every_steps=100).log_every == 100


def test_a_series_of_few_points_is_drawn_with_markers(tmp_path, monkeypatch):
  """A 45-step fine-tune that logs its training metrics once: each panel shows its point."""
  writer = writers.EventFileMetricWriter(str(tmp_path))
  writer.write_scalars(45, {'train_loss': 1.2, 'train_accuracy': 0.6, 'train_learning_rate': 0.01})
  writer.write_scalars(45, {'eval_loss': 1.3, 'eval_accuracy': 0.55})
  writer.flush()
  drawn = []
  monkeypatch.setattr(Figure, 'savefig', lambda figure, path, **kwargs: drawn.append(figure))
  curves.write_training_curves(str(tmp_path), steps_per_epoch=45)
  [figure] = drawn
  lines = [line for axes in figure.axes for line in axes.get_lines() if isinstance(line, matplotlib.lines.Line2D)]
  assert {line.get_label() for line in lines} >= {'train loss', 'train accuracy', 'train learning rate'}
  assert all(line.get_marker() not in (None, 'None', '') for line in lines)
  assert figure.axes[0].get_title() == 'loss' and figure.axes[0].get_yscale() == 'log'  # Early spikes stay readable.
