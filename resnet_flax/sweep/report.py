"""The report of a sweep, in `<sweep workdir>/report/`: what was tried, what won, and how to run it again.

`python -m resnet_flax.sweep --report <workdir>` writes it (and every sweep at its end):

- `trials.md` / `trials.csv`: one row per trial (also in the log). A PRUNED trial's validation accuracy is the
  one of its last evaluation (optuna keeps the last reported value), at the step in `pruned at step`.
- `best_config.py`: the best trial as a config file for `main.py`. It loads the sweep's config file and assigns
  only what differs from it (the sweep's command-line overrides, then the trial's values), floats as their `repr`,
  so it reads as a diff and reproduces the trial exactly; on writing it is loaded back and must equal the trial's
  config, else the report stops instead of exporting a config that would train something else.
- `optimization_history.png`, `param_importances.png` (optuna's, PED-ANOVA by default). Importances need two
  COMPLETE trials whose parameters differ; otherwise the plot is skipped, with the reason in the log and JSON.
- `report.json`: counts per state, the best trial, the baseline trial (the config's own values, run first under
  the same budget) and the difference, the storage URL without its password.

The best trial is the COMPLETE trial with the best validation accuracy (`study.best_trial`). Its best checkpoint
is then evaluated on the test split (`evaluate.evaluate_checkpoint`, which also writes its report in the trial's
workdir): that accuracy is reported, never used to choose, so it stays an unbiased estimate of the chosen config.
"""

from __future__ import annotations

import csv
import json
import os
import runpy
import warnings
from typing import Any

import matplotlib
import ml_collections
import optuna
from absl import logging
from matplotlib import pyplot
from optuna.visualization import matplotlib as optuna_plots

from resnet_flax import evaluate
from resnet_flax.errors import ConfigError
from resnet_flax.run.workdir import CONFIG_FILE
from resnet_flax.sweep import records

REPORT_DIR = 'report'
TEST_NOTE = 'reported, never used to choose: validation accuracy chose the trial'


def write_report(workdir: str) -> dict[str, Any]:
  """Writes `<workdir>/report/` (module docstring) for the sweep in `workdir`; returns what report.json holds."""
  info = records.load_info(workdir)
  study = records.open_study(info)
  trials = study.get_trials(deepcopy=False)
  best = best_trial(study, trials)
  directory = os.path.join(info.workdir, REPORT_DIR)
  os.makedirs(directory, exist_ok=True)
  table = write_tables(trial_rows(trials), directory)
  logging.info('Trials of sweep %s:\n%s', info.study_name, table)
  best_config = write_best_config(info, best, os.path.join(directory, 'best_config.py'))
  plots = write_plots(study, trials, directory)
  config = records.trial_config(info, best.params)
  config.eval.checkpoint = 'best'  # The checkpoint whose validation accuracy is the trial's value.
  test = evaluate.evaluate_checkpoint(config, records.trial_workdir(info, best))
  report = {
    'study_name': info.study_name,
    'storage': records.masked(info.storage),  # Without its password.
    'trials': {state.name: sum(t.state == state for t in trials) for state in optuna.trial.TrialState},
    'best_trial': {
      'number': best.number,
      'params': best.params,
      'validation_accuracy': best.value,
      'test_accuracy': test['accuracy'],
      'test_accuracy_note': TEST_NOTE,
      'workdir': records.trial_workdir(info, best),
    },
    'baseline': baseline_summary(trials, best),
    'param_importances': plots['param_importances'],
    'paths': {
      'trials_md': os.path.join(directory, 'trials.md'),
      'trials_csv': os.path.join(directory, 'trials.csv'),
      'best_config': best_config,
      **plots['paths'],
    },
  }
  with open(os.path.join(directory, 'report.json'), 'w') as f:
    json.dump(report, f, indent=2)
  with open(os.path.join(directory, 'trials.md'), 'w') as f:
    f.write(f'# Sweep {info.study_name}\n\n{table}\n{best_summary(report)}')
  logging.info('%s Report in %s', best_summary(report).replace('\n', ' ').strip(), directory)
  return report


def best_trial(study: optuna.Study, trials: list[optuna.trial.FrozenTrial]) -> optuna.trial.FrozenTrial:
  """The COMPLETE trial with the best validation accuracy."""
  if not any(t.state == optuna.trial.TrialState.COMPLETE for t in trials):
    states = ', '.join(f'{t.number} {t.state.name}' for t in trials) or 'no trials'
    raise ConfigError(
      f'sweep {study.study_name!r} has no COMPLETE trial yet ({states}): wait until a trial finishes, '
      'or run more trials with the same python -m resnet_flax.sweep command, then report again'
    )
  return study.best_trial


def trial_rows(trials: list[optuna.trial.FrozenTrial]) -> list[dict[str, Any]]:
  """One row per trial: its outcome, then each parameter (by its config field)."""
  names = sorted({name for t in trials for name in t.params})
  return [
    {
      'number': t.number,
      'state': t.state.name,
      'validation accuracy': t.value,
      'duration (s)': t.duration.total_seconds() if t.duration else None,
      'evaluations reported': len(t.intermediate_values),
      'pruned at step': t.last_step if t.state == optuna.trial.TrialState.PRUNED else None,
      'retried from': ', '.join(map(str, repeated_trials(t))),
      'baseline': bool(t.user_attrs.get('baseline')),
      **{name: t.params.get(name) for name in names},
    }
    for t in trials
  ]


def repeated_trials(trial: optuna.trial.FrozenTrial) -> list[int]:
  """The trials that `trial` runs again: retried (their worker died), or requeued (a stop signal)."""
  requeued = [trial.user_attrs['requeued_from']] if 'requeued_from' in trial.user_attrs else []
  return [*retry_history(trial), *requeued]


def retry_history(trial: optuna.trial.FrozenTrial) -> list[int]:
  """The trials that `trial` retries, oldest first: their workers died (`RetryHeartbeatStaleTrialCallback`)."""
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', optuna.exceptions.ExperimentalWarning)
    return optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(trial)


def write_tables(rows: list[dict[str, Any]], directory: str) -> str:
  """Writes trials.csv (exact values); returns the markdown table (rounded) of trials.md."""
  with open(os.path.join(directory, 'trials.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows({k: '' if v is None else v for k, v in row.items()} for row in rows)
  lines = ['| ' + ' | '.join(rows[0]) + ' |', '|' + ' --- |' * len(rows[0])]
  lines += ['| ' + ' | '.join(markdown_cell(v) for v in row.values()) + ' |' for row in rows]
  return '\n'.join(lines) + '\n'


def markdown_cell(value: Any) -> str:
  if value is None or value is False:
    return ''
  if value is True:
    return 'yes'
  return f'{value:.4g}' if isinstance(value, float) else str(value)


def best_summary(report: dict[str, Any]) -> str:
  best, baseline = report['best_trial'], report['baseline']
  lines = [
    f'Best trial: {best["number"]}, validation accuracy {best["validation_accuracy"]:.4f} (best_config.py).',
    f'Its test accuracy: {best["test_accuracy"]:.4f} ({TEST_NOTE}).',
  ]
  if baseline['number'] is not None:
    lines.append(
      f"Baseline (trial {baseline['number']}, the config's own values): validation accuracy "
      f'{baseline["validation_accuracy"]:.4f}, the best is {baseline["best_minus_baseline"]:+.4f} from it.'
    )
  return '\n'.join(lines) + '\n'


def baseline_summary(trials: list[optuna.trial.FrozenTrial], best: optuna.trial.FrozenTrial) -> dict[str, Any]:
  """The COMPLETE baseline trial (a retried baseline keeps the mark) against the best."""
  complete = [t for t in trials if t.user_attrs.get('baseline') and t.state == optuna.trial.TrialState.COMPLETE]
  if not complete:
    return {'number': None, 'validation_accuracy': None, 'best_minus_baseline': None, 'note': 'no COMPLETE baseline'}
  baseline = complete[0]
  return {
    'number': baseline.number,
    'validation_accuracy': baseline.value,
    'best_minus_baseline': best.value - baseline.value,
  }


def write_best_config(info: records.SweepInfo, trial: optuna.trial.FrozenTrial, path: str) -> str:
  """best_config.py (module docstring), checked by loading it back, after checking that the sweep's
  config file still gives the config the trial trained with (its workdir's config.json)."""
  config = records.trial_config(info, trial.params)
  with open(os.path.join(records.trial_workdir(info, trial), CONFIG_FILE)) as f:
    trained = json.load(f)
  if json.loads(config.to_json_best_effort()) != trained:
    raise ConfigError(
      f'{info.config_file} (or a file it imports) changed since trial {trial.number} trained: its config.json in '
      f'{records.trial_workdir(info, trial)} is what it trained with; restore the file to export best_config.py'
    )
  with open(path, 'w') as f:
    f.write(best_config_source(info, trial, config))
  if runpy.run_path(path)['get_config']().to_dict() != config.to_dict():
    raise ConfigError(
      f'{path} does not reproduce trial {trial.number}: a value of its config has no exact Python literal; '
      f"run main.py with --config={info.config_file} and the trial's params ({trial.params}) instead"
    )
  return path


def best_config_source(
  info: records.SweepInfo, trial: optuna.trial.FrozenTrial, config: ml_collections.ConfigDict
) -> str:
  file_values = runpy.run_path(info.config_file)['get_config']().to_dict()
  base_values = records.base_config(info).to_dict()
  trial_fields = differences(base_values, config.to_dict())
  overrides = [(k, v) for k, v in differences(file_values, base_values) if k not in dict(trial_fields)]
  body = ["  config = runpy.run_path(SWEEP_CONFIG)['get_config']()"]
  if overrides:
    body.append("  # The sweep's command-line overrides.")
    body += [f'  config.{name} = {value!r}' for name, value in overrides]
  body.append(
    f"  # Trial {trial.number}'s values." if trial_fields else f"  # Trial {trial.number}: the config's own values."
  )
  body += [f'  config.{name} = {value!r}' for name, value in trial_fields]
  command = f'python main.py --config={os.path.join(info.workdir, REPORT_DIR, "best_config.py")} --workdir=runs/best'
  header = [
    f'"""Trial {trial.number} of sweep {info.study_name!r} ({info.workdir}): validation accuracy {trial.value!r}.',
    '',
    f'Written by python -m resnet_flax.sweep --report {info.workdir}. Train it with:',
    '',
    f'  {command}',
    '"""',
    '',
    'import runpy',
    '',
    f'SWEEP_CONFIG = {info.config_file!r}',
    '',
    '',
    'def get_config():',
  ]
  return '\n'.join([*header, *body, '  return config', ''])


def differences(before: dict[str, Any], after: dict[str, Any], prefix: str = '') -> list[tuple[str, Any]]:
  """(dotted field, value in `after`) of every field whose value differs, sorted as ConfigDict sorts."""
  found = []
  for key, value in after.items():
    old = before.get(key)
    if isinstance(value, dict) and isinstance(old, dict):
      found += differences(old, value, f'{prefix}{key}.')
    elif key not in before or type(old) is not type(value) or old != value:
      found.append((f'{prefix}{key}', value))
  return found


def write_plots(study: optuna.Study, trials: list[optuna.trial.FrozenTrial], directory: str) -> dict[str, Any]:
  """optimization_history.png, and param_importances.png where they can be measured."""
  matplotlib.use('agg')  # No display needed: the report is written where the sweep runs.
  paths = {'optimization_history': os.path.join(directory, 'optimization_history.png')}
  skipped = importances_skipped(trials)
  if skipped is None:
    paths['param_importances'] = os.path.join(directory, 'param_importances.png')
  else:
    logging.info('No param_importances.png: %s', skipped)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', optuna.exceptions.ExperimentalWarning)
    for name, path in paths.items():
      axes = getattr(optuna_plots, f'plot_{name}')(study)
      axes.figure.savefig(path, dpi=100, bbox_inches='tight')
      pyplot.close(axes.figure)
  return {'paths': paths, 'param_importances': {'written': skipped is None, 'skipped_because': skipped}}


def importances_skipped(trials: list[optuna.trial.FrozenTrial]) -> str | None:
  """Why parameter importances cannot be measured, or None."""
  complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
  if len(complete) < 2:
    return f'parameter importances need at least 2 COMPLETE trials, the study has {len(complete)}'
  if all(t.params == complete[0].params for t in complete):
    return 'parameter importances need COMPLETE trials with different parameters; all have the same'
  return None
