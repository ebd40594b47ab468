"""Each evaluation of a workdir keeps a report directory of its own, and eval/index.json lists them all.

Three evaluations of a copy of the shared smoke run (plain, TTA, an attack with a corruption) leave three
directories and three index entries; rerunning one rewrites its directory only; the directory changes with
every setting that changes the numbers and with no other; a corruption baseline is the newest matching
evaluation of its index, or a report in a directory of the old layout.
"""

import datetime
import json
import os
import shutil
from pathlib import Path

import pytest

from configs import smoke
from resnet_flax import evaluate
from resnet_flax.compress import quantize
from resnet_flax.errors import ConfigError
from resnet_flax.evaluate import evaluators, report
from resnet_flax.run import report_paths

from helpers import SMOKE_TOTAL_STEPS, indexed_report_dir

DATA = smoke.get_config().data
# The directory the smoke data's reports went to before the step and settings named it: old workdirs have it.
LEGACY_NAME = 'synthetic-test-02227480'
CORRUPTED = {'corruptions': 'brightness', 'corruption_examples': 20, 'corruption_cache_dir': ''}
ROBUST = 'fgsm-linf-eps8_c-brightness'
SETTINGS = {  # label -> eval fields: three evaluations of one workdir.
  'plain': {},
  'tta-flip': {'tta': 'flip'},
  ROBUST: {'attacks': ('fgsm',), 'attack_examples': 32, 'epsilon_curve': (), **CORRUPTED},
}


def eval_config(**eval_fields):
  config = smoke.get_config()
  config.eval.update(eval_fields)
  return config


def index_of(workdir: Path) -> list[dict]:
  return json.loads((workdir / 'eval' / 'index.json').read_text())['evaluations']


def files_of(workdir: Path) -> dict[Path, tuple[int, bytes]]:
  return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (workdir / 'eval').glob('*/*')}


@pytest.fixture(scope='module')
def evaluated(straight_run, tmp_path_factory):
  """A copy of the smoke run evaluated with each of `SETTINGS`, and the reports."""
  workdir = tmp_path_factory.mktemp('index') / 'run'
  shutil.copytree(straight_run, workdir, ignore=shutil.ignore_patterns('eval'))
  reports = {
    label: evaluate.evaluate_checkpoint(eval_config(**fields), str(workdir)) for label, fields in SETTINGS.items()
  }
  return workdir, reports


def test_three_evaluations_keep_three_reports_and_an_index_of_them(evaluated):
  workdir, reports = evaluated
  directories = {label: indexed_report_dir(workdir, DATA, label) for label in SETTINGS}
  assert sorted(p.name for p in (workdir / 'eval').iterdir()) == sorted(
    ['index.json', *(d.name for d in directories.values())]
  )
  for label, directory in directories.items():
    assert directory.name.startswith(f'synthetic-test-step{SMOKE_TOTAL_STEPS}-{label}-')
    assert json.loads((directory / 'report.json').read_text()) == reports[label]
    assert {'predictions.npz', 'confusion_matrix.png', 'per_class.png'} <= {p.name for p in directory.iterdir()}
  assert {'accuracy_vs_epsilon.png', 'corruptions.png'} <= {p.name for p in directories[ROBUST].iterdir()}
  robust = reports[ROBUST]
  more_numbers = {
    'plain': {},
    'tta-flip': {'tta_accuracy': reports['tta-flip']['tta_accuracy']},
    ROBUST: {
      'worst_case_adversarial_accuracy': robust['adversarial']['worst_case_accuracy'],
      'mean_corruption_accuracy': robust['corruptions']['mean_accuracy'],
    },
  }
  entries = index_of(workdir)
  assert [e['label'] for e in entries] == list(SETTINGS)  # In the order they ran.
  for entry in entries:
    label, written = entry['label'], reports[entry['label']]
    assert entry['headline'] == {'accuracy': written['accuracy'], 'loss': written['loss'], **more_numbers[label]}
    assert entry['directory'] == directories[label].name and entry['data'] == report_paths.report_name(DATA)
    assert entry['step'] == written['checkpoint_step'] == SMOKE_TOTAL_STEPS
    assert datetime.datetime.fromisoformat(entry['time']).tzinfo is not None
  assert entries[1]['settings']['eval.tta'] == 'flip'
  assert entries[2]['settings']['eval.attacks'] == ['fgsm'] and entries[2]['settings']['eval.attack_examples'] == 32


def test_rerunning_an_evaluation_replaces_its_own_files_only(evaluated, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(evaluated[0], workdir)
  before, entries_before = files_of(workdir), index_of(workdir)
  again = evaluate.evaluate_checkpoint(eval_config(tta='flip', checkpoint='latest'), str(workdir))  # As 'best'.
  after, rerun = files_of(workdir), indexed_report_dir(workdir, DATA, 'tta-flip')
  assert set(after) == set(before)
  changed = {path for path in after if after[path] != before[path]}
  assert rerun / 'report.json' in changed and {path.parent for path in changed} == {rerun}
  assert json.loads((rerun / 'report.json').read_text())['checkpoint'] == 'latest'
  entries = index_of(workdir)
  assert [e['label'] for e in entries] == ['plain', ROBUST, 'tta-flip']  # Its entry replaced: now the newest.
  assert entries[:2] == [e for e in entries_before if e['label'] != 'tta-flip']
  assert entries[2]['headline']['tta_accuracy'] == again['tta_accuracy']


def directory_of(config, step: int = SMOKE_TOTAL_STEPS, served: quantize.Recipe | None = None) -> str:
  key = report.report_key(config, evaluators.active(config), step, served)
  return os.path.basename(report_paths.report_dir('w', config.data, key))


def test_the_directory_changes_with_every_setting_that_changes_the_numbers_and_no_other():
  fields = {'attacks': ('pgd20',), 'corruptions': 'fog'}
  base = directory_of(eval_config(**fields))
  assert base.startswith(f'synthetic-test-step{SMOKE_TOTAL_STEPS}-pgd20-linf-eps8_c-fog-')
  assert '-plain-' in directory_of(eval_config())
  changes = {
    'tta': 'flip',
    'attacks': ('pgd20', 'fgsm'),
    'epsilon': 0.0,
    'attack_norm': 'l2',
    'attack_examples': 10,
    'epsilon_curve': (0.5,),
    'corruptions': 'fog,snow',
    'corruption_examples': 10,
    'corruption_seed': 1,
    'corruption_baseline': '/another/run',
  }
  changed = [directory_of(eval_config(**{**fields, field: value})) for field, value in changes.items()]
  other_data = eval_config(**fields)
  other_data.data.synthetic_num_classes = 5
  changed += [
    directory_of(eval_config(**fields), served=quantize.Recipe('ptq')),
    directory_of(eval_config(**fields), served=quantize.Recipe('ptq', stem=False)),
    directory_of(other_data),
  ]
  hashes = {name.rpartition('-')[2] for name in [base, *changed]}  # The hash alone tells them apart, label or not.
  assert len(hashes) == len(changes) + 4
  assert directory_of(eval_config(**fields), step=45) == base.replace(f'step{SMOKE_TOTAL_STEPS}', 'step45')
  assert '-pgd20-linf-eps0_c-fog-' in directory_of(eval_config(**{**fields, 'epsilon': 0.0}))
  assert '_int8-ptq-' in directory_of(eval_config(**fields), served=quantize.Recipe('ptq'))
  same = {'checkpoint': 'latest', 'corruption_cache_dir': '/elsewhere', 'evaluators': 'adversarial'}
  assert {directory_of(eval_config(**{**fields, field: value})) for field, value in same.items()} == {base}
  batched = eval_config(**fields)
  batched.eval_batch_size = 7
  assert directory_of(batched) == base


def test_a_corruption_baseline_is_the_newest_matching_evaluation_of_its_index(evaluated, tmp_path):
  baseline = tmp_path / 'baseline'
  shutil.copytree(evaluated[0], baseline)
  evaluate.evaluate_checkpoint(eval_config(**CORRUPTED, corruption_seed=1), str(baseline))  # Newer, other images.
  scored = evaluate.evaluate_checkpoint(eval_config(**CORRUPTED, corruption_baseline=str(baseline)), str(baseline))
  assert scored['corruptions']['baseline'] == str(indexed_report_dir(baseline, DATA, ROBUST) / 'report.json')
  with pytest.raises(
    ConfigError,
    match=r'looked for a report of brightness on synthetic-test-\w+, on the same 20 images \(seed 2\), in '
    rf'{baseline}/eval/index.json and its reports; none of its 3 corruption reports fits, the newest, .*seed 0 here 2',
  ):
    evaluate.evaluate_checkpoint(
      eval_config(**CORRUPTED, corruption_seed=2, corruption_baseline=str(baseline)), str(baseline)
    )


def test_a_corruption_baseline_in_a_directory_of_the_old_layout_is_found(evaluated, straight_run, tmp_path):
  old = tmp_path / 'old'
  shutil.copytree(straight_run, old, ignore=shutil.ignore_patterns('eval'))
  legacy = Path(report_paths.legacy_report_dir(str(old), DATA))
  assert legacy == old / 'eval' / LEGACY_NAME
  legacy.mkdir(parents=True)
  shutil.copy(indexed_report_dir(evaluated[0], DATA, ROBUST) / 'report.json', legacy)
  scored = evaluate.evaluate_checkpoint(eval_config(**CORRUPTED, corruption_baseline=str(old)), str(old))
  assert scored['corruptions']['baseline'] == str(legacy / 'report.json')


def test_an_index_that_cannot_be_read_is_refused_in_one_line(tmp_path):
  (tmp_path / 'eval').mkdir()
  (tmp_path / 'eval' / 'index.json').write_text('{"evaluations": [')
  with pytest.raises(ConfigError, match='index.json is not an index of evaluations .*: move it away'):
    report_paths.record(str(tmp_path), DATA, report_paths.Evaluation(1, '', {}), {})
