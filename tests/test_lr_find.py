"""The learning-rate range test: an exponential rate, smoothing, divergence, the suggestion, its outputs,
and a workdir whose trained run it leaves exactly as it was."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image

from configs import smoke
from resnet_flax.errors import ConfigError
from resnet_flax.train import lr_find

import helpers

STEPS, MIN_LR, MAX_LR = 30, 1e-3, 1e4  # Up to a rate at which the tiny model surely diverges.
FINDER_ARGS = (
  '--mode=lr_find',
  f'--lr_find_steps={STEPS}',
  f'--lr_find_min={MIN_LR}',
  f'--lr_find_max={MAX_LR}',
  '--config.data.pipeline=device',  # No TensorFlow to import: seconds sooner.
)


def file_hashes(workdir: Path) -> dict[str, str]:
  """sha256 of every file under `workdir` but the finder's own outputs."""
  return {
    str(path.relative_to(workdir)): hashlib.sha256(path.read_bytes()).hexdigest()
    for path in sorted(workdir.rglob('*'))
    if path.is_file() and path.relative_to(workdir).parts[0] != lr_find.OUTPUT_DIR
  }


@pytest.fixture(scope='module')
def found(straight_run, tmp_path_factory):
  """(workdir, hashes of its trained run before the finder, lr_find.json, the output of main.py) of
  `--mode=lr_find` on two devices in a copy of the shared trained smoke run."""
  workdir = tmp_path_factory.mktemp('lr_find') / 'run'
  shutil.copytree(straight_run, workdir)
  assert helpers.finished_steps(workdir) and (workdir / 'run.json').is_file()
  before = file_hashes(workdir)
  returncode, output = helpers.run_main(workdir, *FINDER_ARGS, devices=2)
  assert returncode == 0, output
  return workdir, before, json.loads((workdir / 'lr_find' / 'lr_find.json').read_text()), output


def test_the_trained_run_is_untouched(found):
  workdir, before, _, _ = found
  assert file_hashes(workdir) == before


def test_the_rate_grows_exponentially_from_the_minimum(found):
  rates = np.array(found[2]['learning_rates'])  # As the train step used them.
  ratio = (MAX_LR / MIN_LR) ** (1 / (STEPS - 1))
  np.testing.assert_allclose(rates[0], MIN_LR, rtol=1e-5)
  np.testing.assert_allclose(rates[1:] / rates[:-1], ratio, rtol=1e-4)
  np.testing.assert_allclose(lr_find.exponential_schedule(MIN_LR, MAX_LR, STEPS)(STEPS - 1), MAX_LR, rtol=1e-5)


def test_divergence_stops_the_test_and_the_suggestion_lies_below_it(found):
  result = found[2]
  diverged = result['diverged_step']
  assert diverged is not None and result['settings']['steps_run'] < STEPS
  assert result['diverged_learning_rate'] == result['learning_rates'][diverged]
  low, high = result['valley']
  assert MIN_LR <= low <= high < result['diverged_learning_rate']
  assert low * 0.95 <= result['suggested_learning_rate'] <= high * 1.05  # Rounded to 2 significant digits.
  lowest = min(result['smoothed_losses'][:diverged])
  assert result['smoothed_losses'][result['learning_rates'].index(result['min_loss_learning_rate'])] == lowest


def test_the_json_the_plot_and_the_log_tell_the_suggestion(found):
  workdir, _, result, output = found
  steps = result['settings']['steps_run']
  assert result['settings']['devices'] == 2
  assert len(result['learning_rates']) == len(result['losses']) == len(result['smoothed_losses']) == steps
  assert all(np.isfinite(result['smoothed_losses'][: result['diverged_step']]))
  assert result['smoothed_losses'][0] == pytest.approx(result['losses'][0])  # Bias-corrected from the first step.
  pixels = image.imread(workdir / 'lr_find' / 'lr_find.png')
  assert pixels.shape[0] > 200 and pixels.shape[1] > 300 and pixels.std() > 0.05
  command = result['train_command']
  assert command.endswith(f' --config.optim.learning_rate={result["suggested_learning_rate"]:g}')
  assert '--mode' not in command and '--lr_find' not in command and command in output


def test_smoothing_is_bias_corrected_and_lags_a_tenth_of_a_decade():
  np.testing.assert_allclose(lr_find.smooth([2.0] * 5, 0.9), 2.0)
  beta = lr_find.smoothing_factor(num_steps=301, min_lr=1e-3, max_lr=1e2)  # 60 steps a decade.
  assert beta / (1 - beta) == pytest.approx(6.0)
  assert np.isnan(lr_find.smooth([2.0, np.nan, 1.0], 0.5)[1:]).all()


def test_divergence_is_a_jump_over_four_times_the_best_or_a_non_finite_loss():
  assert lr_find.divergence_step(np.array([2.0, 1.0, 0.5, 1.9, 2.1, 9.0])) == 4
  assert lr_find.divergence_step(np.array([2.0, 1.0, np.inf])) == 2
  assert lr_find.divergence_step(np.array([2.0, np.nan, 1.0])) == 1
  assert lr_find.divergence_step(np.array([2.0, 1.0, 3.9])) is None


def test_the_suggestion_is_the_middle_of_the_valley():
  rates = np.geomspace(1e-3, 1e2, 51)  # 10 a decade: 1.0 is one of them.
  parabola = np.log10(rates) ** 2 + 1.0  # Within 10% of the fall (9) above 1 for |log10 rate| <= 0.95.
  suggestion = lr_find.suggest(rates, parabola)
  assert suggestion['valley'] == pytest.approx([10**-0.9, 10**0.9])
  assert suggestion['suggested_learning_rate'] == suggestion['min_loss_learning_rate'] == pytest.approx(1.0)


def test_noise_on_a_flat_floor_does_not_move_the_suggestion():
  rates = np.geomspace(1e-3, 1e2, 51)
  log_rate = np.log10(rates)
  floor = 1 + np.maximum(np.abs(log_rate) - 1, 0)  # Falls to 1 at rate 0.1, flat up to 10, rises after.
  floor[20] -= 0.01  # The minimum at the floor's left end (rate 0.1), by noise.
  suggestion = lr_find.suggest(rates, floor)
  assert suggestion['min_loss_learning_rate'] == pytest.approx(0.1)
  assert suggestion['suggested_learning_rate'] == pytest.approx(1.0)


def test_the_command_drops_the_finder_flags_in_either_form():
  argv = ['main.py', '--mode', 'lr_find', '--lr_find_steps=50', '--config.optim.learning_rate', '0.4', '--workdir=a b']
  assert lr_find.train_command(argv, 0.25) == "python main.py '--workdir=a b' --config.optim.learning_rate=0.25"


@pytest.mark.parametrize(
  'steps, min_lr, max_lr, init_from, message',
  [
    (1, None, None, '', 'at least 2 steps'),
    (10, 1.0, 0.1, '', '0 < lr_find_min < lr_find_max'),
    (10, 0.0, 1.0, '', '0 < lr_find_min < lr_find_max'),
    (10, None, None, '/some/run', 'starts from fresh weights'),
  ],
)
def test_bad_settings_are_refused_before_any_work(tmp_path, steps, min_lr, max_lr, init_from, message):
  config = smoke.get_config()
  config.init_from = init_from
  with pytest.raises(ConfigError, match=message):
    lr_find.run_lr_find(config, str(tmp_path / 'w'), steps, min_lr, max_lr)
  assert not (tmp_path / 'w').exists()
