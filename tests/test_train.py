"""The trainer end to end: budget, errors, exact resume after SIGKILL, sharding, TensorBoard."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import smoke
from resnet_flax.errors import ConfigError
from resnet_flax.run import writers
from resnet_flax.train import loop, trainer

import helpers
from helpers import finished_steps, kill_after_first_checkpoint, load_checkpoint

TOTAL_STEPS = helpers.SMOKE_TOTAL_STEPS
run_main = helpers.run_smoke


def test_straight_run_checkpoints_evaluates_and_finishes(straight_run):
  assert finished_steps(straight_run)[-1] == TOTAL_STEPS
  assert len(finished_steps(straight_run)) >= 2
  config = json.loads((straight_run / 'config.json').read_text())
  assert config['num_epochs'] == 6


def test_tensorboard_holds_train_and_eval_scalars(straight_run):
  scalars = writers.read_scalars(str(straight_run))
  for tag in ('train_loss', 'train_accuracy', 'train_learning_rate', 'steps_per_sec', 'eval_loss', 'eval_accuracy'):
    assert tag in scalars, sorted(scalars)
  assert [step for step, _ in scalars['train_loss']] == list(range(1, TOTAL_STEPS + 1))
  assert [step for step, _ in scalars['eval_accuracy']] == list(range(8, TOTAL_STEPS + 1, 8))
  assert scalars['eval_accuracy'][-1][1] > 0.5  # The synthetic classes are learnable.
  assert scalars['train_learning_rate'][-1][1] < scalars['train_learning_rate'][10][1]


def test_rerun_of_a_complete_run_says_so_and_exits_zero(straight_run):
  returncode, output = run_main(straight_run)
  assert returncode == 0
  assert 'already complete' in output
  assert finished_steps(straight_run)[-1] == TOTAL_STEPS


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_identical(straight_run, tmp_path):
  killed_at = kill_after_first_checkpoint(tmp_path, timeout_s=120)
  assert killed_at and killed_at[-1] < TOTAL_STEPS

  returncode, output = run_main(tmp_path)
  assert returncode == 0, output
  assert f'Resuming from the checkpoint of step {killed_at[-1]}' in output
  resumed, straight = load_checkpoint(tmp_path, TOTAL_STEPS), load_checkpoint(straight_run, TOTAL_STEPS)
  for name in ('params', 'batch_stats', 'opt_state', 'step'):
    jax.tree.map(np.testing.assert_array_equal, resumed[name], straight[name])
  final_eval = lambda w: {t: writers.read_scalars(str(w))[t][-1] for t in ('eval_loss', 'eval_accuracy')}
  assert final_eval(tmp_path) == final_eval(straight_run)


@pytest.mark.slow
def test_four_devices_give_the_losses_of_one(straight_run, tmp_path):
  returncode, output = run_main(tmp_path, devices=4)
  assert returncode == 0, output
  four = [loss for _, loss in writers.read_scalars(str(tmp_path))['train_loss']]
  one = [loss for _, loss in writers.read_scalars(str(straight_run))['train_loss']]
  assert len(four) == TOTAL_STEPS
  # Summing in another order changes the last bits, and training amplifies that step by step: tight at
  # first (per-device BatchNorm statistics would be off by percents from step 1), looser later.
  np.testing.assert_allclose(four[:3], one[:3], rtol=1e-5)
  np.testing.assert_allclose(four, one, rtol=2e-2, atol=1e-3)


def test_over_budget_model_exits_nonzero_with_one_line(tmp_path):
  returncode, output = run_main(tmp_path, '--config.model.name=resnet18_imagenet_stem')
  assert returncode != 0
  last_line = output.strip().splitlines()[-1]
  assert last_line.startswith('error: the model has 11,181,642 trainable parameters, over the budget of 5,000,000')
  assert '--config.model.max_params=' in last_line
  assert not finished_steps(tmp_path)


@pytest.mark.parametrize(
  'override, message',
  [
    ('--config.optim.learnin_rate=0.1', "unknown config field 'learnin_rate'; did you mean 'learning_rate'?"),
    ('--config.batch_size=0', '--config.batch_size=0 is invalid: must be > 0'),
    ('--config.optim.learning_rate=fast', "could not convert string to float: 'fast'"),
    ('--config.data.pipeline=gpu', "--config.data.pipeline='gpu' is invalid: choose one of device, tfdata"),
  ],
)
def test_bad_config_is_one_clear_line(tmp_path, override, message):
  returncode, output = run_main(tmp_path, override)
  lines = [l for l in output.strip().splitlines() if not l.startswith(('W', 'I'))]
  assert returncode != 0
  assert lines == [lines[-1]] and message in lines[-1], output
  assert not finished_steps(tmp_path)


@pytest.mark.parametrize(
  'source, message',
  [
    (
      'def get_config(:\n',
      'the --config file failed to load: SyntaxError: invalid syntax ({path}, line 1); fix the file',
    ),
    (
      'def get_config():\n  return 1 / 0\n',
      'the --config file failed to load: ZeroDivisionError: division by zero ({path}, line 2)',
    ),
    (None, "cannot load the --config file: [Errno 2] No such file or directory: '{path}'"),
  ],
)
def test_a_config_file_that_does_not_load_is_one_clear_line(tmp_path, source, message):
  path = tmp_path / 'my_config.py'
  if source is not None:
    path.write_text(source)
  returncode, output = run_main(tmp_path / 'run', f'--config={path}')  # The last --config counts.
  assert returncode == 1
  assert output.strip().splitlines()[-1].startswith(f'error: {message.format(path=path)}'), output
  assert 'Traceback' not in output


def test_batch_not_divisible_by_device_count_is_refused(tmp_path):
  returncode, output = run_main(tmp_path, '--config.batch_size=66', devices=4)
  assert returncode != 0
  assert 'error: --config.batch_size=66 is not divisible by the 4 devices' in output


def test_resume_with_another_model_is_refused(straight_run):
  config = smoke.get_config()
  config.model.name = 'resnet18'
  with pytest.raises(ConfigError, match=r'model.name: resnet_tiny -> resnet18.*use a new --workdir'):
    trainer.train_and_evaluate(config, str(straight_run))


@pytest.mark.parametrize('pipeline', ['device', 'tfdata'])
def test_training_steps_make_no_hidden_host_device_transfers(pipeline, tmp_path, monkeypatch):
  """The whole loop (steps, logging, evaluation, checkpoints) under `transfer_guard('disallow')`: every
  host read is an explicit `jax.device_get`, every upload an explicit `device_put`."""
  with jax.transfer_guard('disallow'), pytest.raises(Exception, match='Disallowed host-to-device transfer'):
    jax.jit(lambda x: x + 1)(1)  # The guard is in force on this platform: an implicit upload fails.

  run = loop.TrainLoop.run

  def guarded_run(self, state, start_step):
    with jax.transfer_guard('disallow'):
      return run(self, state, start_step)

  monkeypatch.setattr(loop.TrainLoop, 'run', guarded_run)
  config = smoke.get_config()
  config.num_epochs, config.data.pipeline = 1.0, pipeline
  metrics = trainer.train_and_evaluate(config, str(tmp_path))
  assert finished_steps(tmp_path)[-1] == 8 and metrics['accuracy'] > 0


def test_checkpoints_keep_the_layout_that_earlier_versions_resume_from(straight_run):
  """tests/data/smoke_checkpoint_layout.json is the layout of a smoke checkpoint written by the code of
  stop 9 (before the optimizer, workdir and evaluation modules were split out): the same leaves, names,
  shapes and dtypes, so its workdirs resume here, optimizer state included."""
  expected = json.loads((Path(__file__).parent / 'data' / 'smoke_checkpoint_layout.json').read_text())
  assert helpers.checkpoint_layout(straight_run, TOTAL_STEPS) == expected


@pytest.mark.parametrize(
  'half_precision, dtype, backend, warns',
  [
    (True, 'float32', 'cpu', True),
    (False, 'bfloat16', 'cpu', True),
    (True, 'float32', 'gpu', False),
    (False, 'float32', 'cpu', False),
  ],
)
def test_bfloat16_on_a_cpu_is_warned_about(caplog, half_precision, dtype, backend, warns):
  config = smoke.get_config()
  config.half_precision, config.model.dtype = half_precision, dtype
  with caplog.at_level('WARNING'):
    trainer.warn_if_bfloat16_on_cpu(config, backend)
  assert any('bfloat16 on a CPU' in record.getMessage() for record in caplog.records) == warns
