"""The sweep report: a study made by hand (no training), whose best trial's directory is a real smoke run."""

import csv
import datetime
import json
import shutil
from pathlib import Path

import optuna
import pytest
from absl import flags
from ml_collections import config_flags
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState
from PIL import Image

from resnet_flax.errors import UserError
from resnet_flax.sweep import records, report

from helpers import ROOT, SMOKE_ARGS

SPACE = {
  'optim.learning_rate': FloatDistribution(0.01, 2.0, log=True),
  'optim.label_smoothing': FloatDistribution(0, 0.3),
}
OVERRIDES = [*SMOKE_ARGS, '--config.optim.weight_decay=0.000123', "--config.augment.train_ops=('flip',)"]
BEST_RATE = 0.1234567890123457  # 17 significant digits: exported exactly or not at all.
START = datetime.datetime(2026, 1, 1)


def frozen_trial(state, params, value=None, evaluations=None, user_attrs=None, system_attrs=None) -> FrozenTrial:
  """A finished (or RUNNING) trial of 12.5 s, as the sweep records them."""
  return FrozenTrial(
    number=0,
    trial_id=0,
    state=state,
    value=value,
    values=None,
    datetime_start=START,
    datetime_complete=None if state == TrialState.RUNNING else START + datetime.timedelta(seconds=12.5),
    params=params,
    distributions={name: SPACE[name] for name in params},
    user_attrs=user_attrs or {},
    system_attrs=system_attrs or {},
    intermediate_values=evaluations or {},
  )


def params(rate, smoothing):
  return {'optim.learning_rate': rate, 'optim.label_smoothing': smoothing}


# Trial 1 is the best by validation; 4 retries 3 (whose worker died) in its directory; 0 is the baseline.
TRIALS = [
  frozen_trial(
    TrialState.COMPLETE, params(0.05, 0.0), 0.6, {8: 0.5, 48: 0.6}, {'workdir': 'trial-0', 'baseline': True}
  ),
  frozen_trial(TrialState.COMPLETE, params(BEST_RATE, 0.05), 0.75, {8: 0.6, 48: 0.75}, {'workdir': 'trial-1'}),
  frozen_trial(TrialState.PRUNED, params(1.5, 0.2), 0.2, {8: 0.2}, {'workdir': 'trial-2'}),
  frozen_trial(TrialState.FAIL, params(0.3, 0.1), None, {8: 0.55}, {'workdir': 'trial-3'}),
  frozen_trial(
    TrialState.COMPLETE,
    params(0.3, 0.1),
    0.7,
    {8: 0.55, 48: 0.7},
    {'workdir': 'trial-3'},
    {'failed_trial': 3, 'retry_history': [3]},
  ),
  frozen_trial(TrialState.RUNNING, params(0.02, 0.0), None, {8: 0.4}, {'workdir': 'trial-5'}),
]


def write_sweep(workdir, trials, storage=None) -> records.SweepInfo:
  """sweep.json and a SQLite study holding `trials`."""
  workdir.mkdir(parents=True, exist_ok=True)
  url = f'sqlite:///{workdir / "study.db"}'
  info = records.SweepInfo(
    workdir=str(workdir),
    storage=storage or url,
    study_name='smoke-sweep',
    config_file=str(ROOT / 'configs' / 'smoke.py'),
    config_args=OVERRIDES,
    space_file=str(workdir / 'space.py'),
  )
  info.save()
  study = optuna.create_study(storage=url, study_name=info.study_name, direction='maximize')
  for trial in trials:
    study.add_trial(trial)
  return info


def load_like_main(path) -> dict:
  """The config file at `path` as main.py loads it (ml_collections' config_flags), as a dict."""
  argv = ['main.py', f'--config={path}']
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=flag_values, lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config.to_dict()


@pytest.fixture(scope='module')
def swept(straight_run, tmp_path_factory):
  """(info, report) of the hand-made sweep; trial 1's directory is a copy of a trained smoke run. The study
  is in SQLite, but sweep.json names a PostgreSQL storage with a password, which the report must not show."""
  workdir = tmp_path_factory.mktemp('sweep')
  info = write_sweep(workdir, TRIALS, storage='postgresql://sweeper:s3cret@db.example:5432/sweeps')
  shutil.copytree(straight_run, workdir / 'trial-1', ignore=shutil.ignore_patterns('eval'))  # Only the report's.
  trained = records.trial_config(info, TRIALS[1].params)  # What trial 1 trained with, as a sweep would have.
  (workdir / 'trial-1' / 'config.json').write_text(trained.to_json_best_effort(indent=2))
  study = optuna.load_study(study_name=info.study_name, storage=f'sqlite:///{workdir / "study.db"}')
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(records, 'open_study', lambda _: study)
    written = report.write_report(str(workdir))
  return info, written


def test_table_has_a_row_per_trial_with_its_outcome(swept):
  info, _ = swept
  with open(f'{info.workdir}/report/trials.csv') as f:
    rows = list(csv.DictReader(f))
  assert [(r['number'], r['state'], r['validation accuracy']) for r in rows] == [
    ('0', 'COMPLETE', '0.6'),
    ('1', 'COMPLETE', '0.75'),
    ('2', 'PRUNED', '0.2'),
    ('3', 'FAIL', ''),
    ('4', 'COMPLETE', '0.7'),
    ('5', 'RUNNING', ''),
  ]
  assert [r['evaluations reported'] for r in rows] == ['2', '2', '1', '1', '2', '1']
  assert [r['pruned at step'] for r in rows] == ['', '', '8', '', '', '']
  assert [r['retried from'] for r in rows] == ['', '', '', '', '3', '']
  assert [r['baseline'] for r in rows] == ['True'] + ['False'] * 5
  assert [r['duration (s)'] for r in rows] == ['12.5'] * 5 + ['']
  assert rows[1]['optim.learning_rate'] == repr(BEST_RATE) and rows[1]['optim.label_smoothing'] == '0.05'
  markdown = open(f'{info.workdir}/report/trials.md').read()
  assert '| 2 | PRUNED | 0.2 | 12.5 | 1 | 8 |  |  | 0.2 | 1.5 |' in markdown
  assert '| 4 | COMPLETE | 0.7 | 12.5 | 2 |  | 3 |  | 0.1 | 0.3 |' in markdown
  assert 'reported, never used to choose' in markdown


def test_best_is_chosen_by_validation_and_only_then_tested(swept):
  info, report = swept
  best = report['best_trial']
  assert (best['number'], best['validation_accuracy'], best['params']) == (1, 0.75, params(BEST_RATE, 0.05))
  assert best['workdir'] == f'{info.workdir}/trial-1'
  reports = list((Path(info.workdir) / 'trial-1' / 'eval').glob('*/report.json'))
  assert len(reports) == 1 and best['test_accuracy'] == json.loads(reports[0].read_text())['accuracy']
  assert 'never used to choose' in best['test_accuracy_note']
  assert report['trials'] == {'RUNNING': 1, 'COMPLETE': 3, 'PRUNED': 1, 'FAIL': 1, 'WAITING': 0}
  assert report['baseline']['number'] == 0 and report['baseline']['validation_accuracy'] == 0.6
  assert report['baseline']['best_minus_baseline'] == pytest.approx(0.15)
  assert json.loads(open(f'{info.workdir}/report/report.json').read()) == report


def test_best_config_reproduces_the_trial_as_main_loads_it(swept):
  info, report = swept
  path = f'{info.workdir}/report/best_config.py'
  assert load_like_main(path) == records.trial_config(info, report['best_trial']['params']).to_dict()
  text = open(path).read()
  assignments = [line.strip() for line in text.splitlines() if line.strip().startswith('config.')]
  assert assignments == [
    "config.augment.train_ops = ('flip',)",  # The sweep's overrides.
    'config.log_every_steps = 1',
    'config.num_epochs = 6.0',
    'config.optim.weight_decay = 0.000123',
    'config.optim.label_smoothing = 0.05',  # The trial's values.
    f'config.optim.learning_rate = {BEST_RATE!r}',
  ]
  assert f'python main.py --config={info.workdir}/report/best_config.py --workdir=runs/best' in text
  assert f"SWEEP_CONFIG = '{ROOT}/configs/smoke.py'" in text


def test_plots_are_images(swept):
  info, report = swept
  for name in ('optimization_history', 'param_importances'):
    assert report['paths'][name] == f'{info.workdir}/report/{name}.png'
    with Image.open(report['paths'][name]) as image:
      assert image.format == 'PNG' and image.width > 200 and image.height > 200
  assert report['param_importances'] == {'written': True, 'skipped_because': None}


def test_storage_password_is_masked(swept):
  info, report = swept
  assert report['storage'] == 'postgresql://sweeper:***@db.example:5432/sweeps'
  for path in (Path(info.workdir) / 'report').iterdir():
    assert b's3cret' not in path.read_bytes(), path


@pytest.mark.parametrize(
  'trials, reason',
  [
    ([TRIALS[0], TRIALS[2]], 'need at least 2 COMPLETE trials, the study has 1'),
    ([TRIALS[4], frozen_trial(TrialState.COMPLETE, params(0.3, 0.1), 0.5)], 'all have the same'),
  ],
)
def test_importances_are_skipped_with_a_reason(tmp_path, trials, reason):
  study = optuna.create_study(direction='maximize')
  for trial in trials:
    study.add_trial(trial)
  plots = report.write_plots(study, study.trials, str(tmp_path))
  assert plots['param_importances']['written'] is False and reason in plots['param_importances']['skipped_because']
  assert sorted(p.name for p in tmp_path.iterdir()) == ['optimization_history.png']


def test_a_workdir_without_a_sweep_is_one_line(tmp_path):
  with pytest.raises(UserError, match='sweep.json does not exist') as error:
    report.write_report(str(tmp_path))
  assert '\n' not in str(error.value)


def test_a_study_without_a_complete_trial_is_one_line_and_writes_nothing(tmp_path):
  write_sweep(tmp_path, [TRIALS[2], TRIALS[3], TRIALS[5]])
  with pytest.raises(UserError, match='no COMPLETE trial yet .0 PRUNED, 1 FAIL, 2 RUNNING.') as error:
    report.write_report(str(tmp_path))
  assert '\n' not in str(error.value) and not (tmp_path / 'report').exists()


def test_a_config_file_changed_since_the_trial_trained_is_refused(tmp_path):
  info = write_sweep(tmp_path, [TRIALS[1]])
  trial = optuna.load_study(study_name=info.study_name, storage=f'sqlite:///{tmp_path / "study.db"}').trials[0]
  trained = records.trial_config(info, {**trial.params, 'optim.learning_rate': 0.5})  # Not what the file gives now.
  (tmp_path / 'trial-1').mkdir()
  (tmp_path / 'trial-1' / 'config.json').write_text(trained.to_json_best_effort())
  with pytest.raises(UserError, match='changed since trial 0 trained') as error:
    report.write_best_config(info, trial, str(tmp_path / 'best_config.py'))
  assert '\n' not in str(error.value) and not (tmp_path / 'best_config.py').exists()
