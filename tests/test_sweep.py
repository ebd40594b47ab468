"""Sweeps: the search space and storage checked before any training, and whole studies whose worker is
killed mid-trial (SQLite with --workers=2; PostgreSQL with the command run twice, as on two machines)."""

import os
import signal
import socket
import time
import uuid

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from configs import smoke
from resnet_flax.errors import ConfigError
from resnet_flax.run import writers
from resnet_flax.sweep import records, search_space, workers

from helpers import finished_steps, run_main, run_sweep

POSTGRES_URL = os.environ.get('RESNET_FLAX_TEST_POSTGRES_URL')
SPACE = """
from optuna.distributions import FloatDistribution

def get_space():
  return {'optim.learning_rate': FloatDistribution(0.01, 0.1, log=True)}
"""
# Smoke trials of 60 steps (6 a epoch), validated on 128 held-out images every 5 epochs: long enough
# to be killed between checkpoints, short enough for the suite.
TRIAL_STEPS = 60
TRIAL_ARGS = (
  '--config=configs/smoke.py',
  '--config.data.validation_size=128',
  '--config.num_epochs=10',
  '--config.eval_every_epochs=5',
  '--config.checkpoint_every_steps=10',
  '--config.log_every_steps=30',
)


@pytest.fixture
def space_file(tmp_path):
  path = tmp_path / 'space.py'
  path.write_text(SPACE)
  return path


def test_every_field_of_the_space_must_exist_and_fit_the_config():
  config = smoke.get_config()
  with pytest.raises(ConfigError, match=r"'optim.learning_rat'.*did you mean 'optim.learning_rate'"):
    search_space.check_space({'optim.learning_rat': FloatDistribution(0.1, 1.0)}, config)
  with pytest.raises(ConfigError, match='model.name'):
    search_space.check_space({'model.name': FloatDistribution(0.1, 1.0)}, config)
  with pytest.raises(ConfigError, match='optim.label_smoothing=1.5'):
    search_space.check_space({'optim.label_smoothing': FloatDistribution(0.0, 1.5)}, config)
  search_space.check_space({'optim.learning_rate': FloatDistribution(0.01, 1.0, log=True)}, config)


def test_trial_configs_leave_the_base_config_as_it_is():
  config = smoke.get_config()
  trial = search_space.with_params(config, {'optim.learning_rate': 0.3, 'model.name': 'resnet18_half'})
  assert (trial.optim.learning_rate, trial.model.name) == (0.3, 'resnet18_half')
  assert (config.optim.learning_rate, config.model.name) == (0.05, 'resnet_tiny')


def test_the_grid_walks_choices_and_steps_and_refuses_continuous_ranges():
  space = {
    'optim.label_smoothing': FloatDistribution(0.0, 0.2, step=0.1),
    'batch_size': IntDistribution(32, 64, step=32),
    'model.name': CategoricalDistribution(['resnet_tiny', 'resnet18_half']),
  }
  values = search_space.grid(space)
  assert values['optim.label_smoothing'] == pytest.approx([0.0, 0.1, 0.2])
  assert values['batch_size'] == [32, 64]
  assert values['model.name'] == ['resnet_tiny', 'resnet18_half']
  with pytest.raises(ConfigError, match='--sampler=grid.*optim.learning_rate'):
    search_space.grid({'optim.learning_rate': FloatDistribution(0.01, 1.0, log=True)})


@pytest.mark.parametrize('learning_rate, queued', [(0.05, True), (0.5, False)])
def test_the_baseline_trial_is_queued_only_inside_the_space(learning_rate, queued):
  config = smoke.get_config()
  config.optim.learning_rate = learning_rate
  study = optuna.create_study(direction='maximize')
  records.enqueue_baseline(study, {'optim.learning_rate': FloatDistribution(0.01, 0.1, log=True)}, config)
  trials = study.get_trials(states=(TrialState.WAITING,))
  assert [(t.system_attrs['fixed_params'], t.user_attrs) for t in trials] == (
    [({'optim.learning_rate': 0.05}, {'baseline': True})] if queued else []
  )


def test_evaluations_are_read_back_as_the_trainer_wrote_them(tmp_path):
  writer = writers.CsvMetricWriter(str(tmp_path / writers.METRICS_CSV), steps_per_epoch=10)
  writer.write_scalars(5, {'train_loss': 2.0})
  writer.write_scalars(10, {'eval_accuracy': 0.1234567})
  writer.write_scalars(20, {'eval_accuracy': 0.5})
  writer.close()
  assert workers.evaluations(str(tmp_path)) == {10: pytest.approx(0.1234567, rel=1e-7), 20: 0.5}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.parametrize(
  'args, message',
  [
    (('--config.optim.lr_peak=1',), "unknown config field 'lr_peak'"),
    (('--storage=postgresql://nobody@127.0.0.1:{port}/study',), 'cannot open the study storage postgresql://nobody@'),
    (('--storage=sqlite:////no/such/directory/study.db',), 'cannot open the study storage sqlite:////no/such'),
  ],
)
def test_bad_fields_and_unreachable_storage_are_one_line_before_any_training(tmp_path, space_file, args, message):
  args = [arg.format(port=free_port()) for arg in args]
  start = time.monotonic()
  returncode, output = run_sweep(*TRIAL_ARGS, f'--space={space_file}', f'--workdir={tmp_path / "sweep"}', *args)
  assert returncode != 0
  assert message in output.strip().splitlines()[-1], output
  assert 'Traceback' not in output
  assert not list((tmp_path / 'sweep').glob('trial-*'))
  assert time.monotonic() - start < 60


def test_a_space_naming_a_missing_field_is_one_line(tmp_path):
  space = tmp_path / 'space.py'
  space.write_text(SPACE.replace('optim.learning_rate', 'optim.learning_rat'))
  returncode, output = run_sweep(*TRIAL_ARGS, f'--space={space}', f'--workdir={tmp_path / "sweep"}')
  assert returncode != 0
  last = output.strip().splitlines()[-1]
  assert last.startswith('error: ') and "'optim.learning_rat'" in last and "'optim.learning_rate'" in last, output
  assert not list((tmp_path / 'sweep').glob('trial-*'))


def wait_for_a_checkpoint_of_trial_0(study_name: str, storage: str, workdir, timeout: float = 240) -> int:
  """The pid of the worker running trial 0, once that trial has saved a checkpoint."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    time.sleep(0.1)
    if not (workdir / records.SWEEP_JSON).exists():  # Written once the study exists.
      continue
    trials = optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False)
    if trials and trials[0].state == TrialState.RUNNING and 'pid' in trials[0].user_attrs:
      if finished_steps(workdir / 'trial-0'):
        return trials[0].user_attrs['pid']
  raise AssertionError('trial 0 saved no checkpoint in time')


def check_the_retried_trial_resumed(study: optuna.Study, workdir):
  trials = study.get_trials()
  states = sorted(t.state.name for t in trials)
  assert states == ['COMPLETE', 'COMPLETE', 'FAIL'] and trials[0].state == TrialState.FAIL, states
  [retried] = [t for t in trials if t.system_attrs.get('failed_trial') == 0]  # RetryHeartbeatStaleTrialCallback's.
  assert retried.params == trials[0].params and retried.user_attrs['baseline']
  assert retried.user_attrs['workdir'] == 'trial-0'
  assert retried.user_attrs['resumed_from_step'] > 0  # From trial 0's checkpoint, not from scratch.
  rows = [(int(row['step']), row['kind']) for row in writers.read_csv_rows(workdir / 'trial-0')]
  assert len(rows) == len(set(rows)) and rows[-1] == (TRIAL_STEPS, 'eval')  # Each step logged once.
  assert not (workdir / f'trial-{retried.number}').exists()
  assert retried.value == workers.best_validation_accuracy(str(workdir / 'trial-0'))


@pytest.mark.slow  # 100 s; the PostgreSQL twin below runs in CI.
def test_a_killed_worker_s_trial_is_retried_from_its_checkpoint_with_sqlite(tmp_path, space_file):
  workdir = tmp_path / 'sweep'
  common = (*TRIAL_ARGS, f'--space={space_file}', f'--workdir={workdir}', '--trials=2', '--heartbeat_seconds=1')
  parent = run_sweep(*common, '--workers=2', wait=False)
  storage = f'sqlite:///{workdir / "study.db"}'
  os.kill(wait_for_a_checkpoint_of_trial_0('sweep', storage, workdir), signal.SIGKILL)
  output, _ = parent.communicate(timeout=300)
  assert parent.returncode == 0, output
  assert 'Worker 0 ended with signal 9' in output or 'Worker 1 ended with signal 9' in output, output
  study = optuna.load_study(study_name='sweep', storage=storage)
  check_the_retried_trial_resumed(study, workdir)

  # The exported config of the best trial reproduces its validation accuracy exactly.
  best_config = workdir / 'report' / 'best_config.py'
  returncode, output = run_main(tmp_path / 'rerun', f'--config={best_config}')
  assert returncode == 0, output
  assert workers.best_validation_accuracy(str(tmp_path / 'rerun')) == study.best_value


@pytest.mark.slow
@pytest.mark.skipif(POSTGRES_URL is None, reason='RESNET_FLAX_TEST_POSTGRES_URL is not set (.ci/run starts a server)')
def test_a_killed_machine_s_trial_is_retried_from_its_checkpoint_with_postgresql(tmp_path, space_file):
  workdir, name = tmp_path / 'sweep', f'kill-{uuid.uuid4().hex[:8]}'
  common = (
    *TRIAL_ARGS,
    f'--space={space_file}',
    f'--workdir={workdir}',
    '--trials=2',
    '--heartbeat_seconds=1',
    f'--storage={POSTGRES_URL}',
    f'--study_name={name}',
  )
  first = run_sweep(*common, wait=False)  # As if on two machines sharing the study and the workdir.
  pid = wait_for_a_checkpoint_of_trial_0(name, POSTGRES_URL, workdir)
  second = run_sweep(*common, wait=False)
  assert pid == first.pid
  first.kill()
  first.communicate()
  output, _ = second.communicate(timeout=300)
  assert second.returncode == 0, output
  check_the_retried_trial_resumed(optuna.load_study(study_name=name, storage=POSTGRES_URL), workdir)
