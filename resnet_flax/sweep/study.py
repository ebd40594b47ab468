"""Hyperparameter sweeps: many short training runs, chosen by validation accuracy, with Optuna.

  python -m resnet_flax.sweep --config=configs/quick.py --space=sweeps/quick.py --workdir=runs/sweep \
      --trials=24 [--storage=postgresql://user:password@host/db] [--workers=2] [--sampler=tpe] [--pruner=median]
  python -m resnet_flax.sweep --report runs/sweep

Optuna does the scheduling: its RDB storage is the queue (SQLite on one machine, PostgreSQL when
several share a study), its samplers choose, its pruners stop, its heartbeats find the trials of
workers that died and `RetryHeartbeatStaleTrialCallback` queues them again. This module links it to
training: a trial is an ordinary run in `<workdir>/trial-<n>` (resumable, TensorBoard, reports) that
reports its validation accuracy at every evaluation, and a retried trial resumes the directory of the
trial it retries. Workers are processes, one trial at a time each (Optuna's `n_jobs` would be threads
sharing one JAX runtime). The test split is never seen here: a config without a validation split is
refused, and the report evaluates the chosen trial on the test split only after choosing.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import difflib
import functools
import json
import logging as std_logging
import math
import os
import runpy
import signal
import socket
import subprocess
import sys
import time
import warnings
import zlib
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np
import optuna
import sqlalchemy
from absl import app, flags, logging
from ml_collections import config_flags
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from resnet_flax import cli, data
from resnet_flax.errors import ConfigError, NonFiniteError, UserError
from resnet_flax.run import checkpoint, preemption, writers
from resnet_flax.run.workdir import Steps
from resnet_flax.train import config_checks, trainer

FLAGS = flags.FLAGS

SWEEP_JSON = 'sweep.json'
MAX_RETRIES = 3  # A trial whose workers keep dying is given up after this many retries.
PRUNER_STARTUP_TRIALS = 3  # Trials that finish before the median pruner may stop one.
PRUNER_WARMUP = 1 / 3  # No trial is stopped in this first fraction of its steps.
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class StorageError(UserError):
  """The study's storage cannot be opened."""


class Interrupted(Exception):
  """A stop signal ended a trial; it is queued again."""


@dataclasses.dataclass(frozen=True)
class SweepInfo:
  """What `sweep.json` records: enough to reopen the study and rebuild any trial's config."""

  workdir: str
  storage: str
  study_name: str
  config_file: str
  config_args: list[str]  # The sweep's --config.field=value overrides, as parsed.
  space_file: str

  def save(self):
    with open(os.path.join(self.workdir, SWEEP_JSON), 'w') as f:
      json.dump(dataclasses.asdict(self), f, indent=2)


def base_config(info: SweepInfo) -> ml_collections.ConfigDict:
  """The sweep's config file with its command-line overrides, parsed as main.py parses them."""
  argv = ['sweep', f'--config={info.config_file}', *info.config_args]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=flag_values, lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def trial_config(info: SweepInfo, params: Mapping[str, Any]) -> ml_collections.ConfigDict:
  return with_params(base_config(info), params)


def load_info(workdir: str) -> SweepInfo:
  path = os.path.join(workdir, SWEEP_JSON)
  if not os.path.exists(path):
    raise ConfigError(f'{path} does not exist: --report takes the --workdir of a sweep')
  with open(path) as f:
    return SweepInfo(**json.load(f))


# The search space.


def load_space(path: str) -> dict[str, BaseDistribution]:
  """`get_space()` of the Python file at `path`: {config field: optuna distribution}."""
  try:
    space = runpy.run_path(path)['get_space']()
  except FileNotFoundError:
    raise ConfigError(f'--space file {path} does not exist') from None
  except KeyError:
    raise ConfigError(f'--space file {path} defines no get_space()') from None
  except Exception as e:
    raise ConfigError(f'the --space file failed to load: {cli.where_it_failed(e)}') from None
  if not isinstance(space, Mapping) or not space:
    raise ConfigError(f'get_space() of {path} must return a non-empty dict of config field -> optuna distribution')
  for field, distribution in space.items():
    if not isinstance(distribution, BaseDistribution):
      raise ConfigError(
        f'get_space() of {path}: {field!r} maps to {distribution!r}; use optuna.distributions.FloatDistribution, '
        'IntDistribution or CategoricalDistribution'
      )
  return dict(space)


def leaf_fields(config: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  fields = []
  for key, value in config.items():
    path = f'{prefix}{key}'
    fields += leaf_fields(value, f'{path}.') if isinstance(value, ml_collections.ConfigDict) else [path]
  return fields


def get_field(config: ml_collections.ConfigDict, field: str) -> Any:
  return functools.reduce(getattr, field.split('.'), config)


def with_params(config: ml_collections.ConfigDict, params: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with each `field: value` of `params` set (ConfigDict checks the types)."""
  config = copy.deepcopy(config)
  for field, value in params.items():
    *parents, name = field.split('.')
    setattr(functools.reduce(getattr, parents, config), name, value)
  return config


def extremes(distribution: BaseDistribution) -> list[Any]:
  if isinstance(distribution, CategoricalDistribution):
    return list(distribution.choices)
  return [distribution.low, distribution.high]


def check_space(space: Mapping[str, BaseDistribution], config: ml_collections.ConfigDict) -> None:
  """Every field exists, and the config validates at every end of every range (before any training)."""
  fields = leaf_fields(config)
  for field, distribution in space.items():
    if field not in fields:
      close = difflib.get_close_matches(field, fields, n=1)
      hint = f'; did you mean {close[0]!r}?' if close else ' (configs/default.py lists every field)'
      raise ConfigError(f'the search space names config field {field!r}, which does not exist{hint}')
    for value in extremes(distribution):
      try:
        config_checks.validate(with_params(config, {field: value}))
      except (TypeError, ValueError) as e:
        raise ConfigError(f'the search space gives {field}={value!r}, which the config refuses: {e}') from None


def grid(space: Mapping[str, BaseDistribution]) -> dict[str, list[Any]]:
  """The values the grid sampler walks: choices, or a range with a step."""
  values = {}
  for field, distribution in space.items():
    if isinstance(distribution, CategoricalDistribution):
      values[field] = list(distribution.choices)
    elif getattr(distribution, 'step', None):
      count = round((distribution.high - distribution.low) / distribution.step) + 1
      values[field] = [distribution.low + i * distribution.step for i in range(count)]
    else:
      raise ConfigError(f'--sampler=grid needs choices or a step for {field}: give its distribution a step= or choices')
  return values


def suggest(trial: optuna.Trial, field: str, distribution: BaseDistribution) -> Any:
  if isinstance(distribution, FloatDistribution):
    return trial.suggest_float(field, distribution.low, distribution.high, step=distribution.step, log=distribution.log)
  if isinstance(distribution, IntDistribution):
    return trial.suggest_int(field, distribution.low, distribution.high, step=distribution.step, log=distribution.log)
  return trial.suggest_categorical(field, distribution.choices)


# The study.


def open_storage(url: str, heartbeat_seconds: int) -> optuna.storages.RDBStorage:
  """The RDB storage at `url`, with heartbeats, failing in seconds with one line when unreachable."""
  connect_args = {'connect_timeout': 10} if url.startswith('postgresql') else {'timeout': 60}
  try:
    with warnings.catch_warnings():  # Heartbeats are "experimental" since Optuna 2.9, and documented in 5.
      warnings.simplefilter('ignore', optuna.exceptions.ExperimentalWarning)
      return optuna.storages.RDBStorage(
        url,
        engine_kwargs={'connect_args': connect_args} if url.startswith(('postgresql', 'sqlite')) else None,
        heartbeat_interval=heartbeat_seconds,
        grace_period=2 * heartbeat_seconds,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES),
      )
  except ImportError as e:  # Optuna's, naming no module: the driver's own is its cause.
    driver = getattr(e.__cause__, 'name', None) or 'its database driver'
    raise StorageError(f"the storage {masked(url)} needs {driver}: pip install 'psycopg[binary]'") from None
  except (sqlalchemy.exc.SQLAlchemyError, ValueError, TypeError) as e:
    reason = ' '.join(str(getattr(e, 'orig', None) or e).split())[:300]
    raise StorageError(
      f'cannot open the study storage {masked(url)}: {reason}; check --storage '
      '(sqlite:///path/study.db on one machine, postgresql://user:password@host:port/database to share)'
    ) from None


def masked(url: str) -> str:
  """`url` without its password; a URL that does not parse shows only its start."""
  try:
    return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
  except Exception:
    return url.partition(':')[0] + ':***'


def sampler_seed(seed: int, study: optuna.Study) -> int:
  """`seed` mixed with this host, process and the trials so far: workers on several machines, and a rerun
  continuing the study, draw new values instead of repeating the first process's."""
  return zlib.crc32(f'{seed} {socket.gethostname()} {os.getpid()} {len(study.trials)}'.encode())


def create_sampler(name: str, space: Mapping[str, BaseDistribution], trials: int, seed: int):
  if name == 'grid':
    return optuna.samplers.GridSampler(grid(space), seed=seed)
  if name == 'random':
    return optuna.samplers.RandomSampler(seed=seed)
  return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, trials // 3)))


def create_pruner(name: str, warmup_steps: int):
  """Stops no trial before `warmup_steps`: early evaluations sit near chance and rank by noise."""
  if name == 'median':
    return optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=warmup_steps)
  if name == 'hyperband':
    return optuna.pruners.HyperbandPruner(min_resource=max(1, warmup_steps))
  return optuna.pruners.NopPruner()


def open_study(info: SweepInfo, sampler=None, pruner=None, heartbeat_seconds: int = 30, create: bool = False):
  """The sweep's study; `create`: a new one when the storage has none of that name."""
  storage = open_storage(info.storage, heartbeat_seconds)
  if not create:
    try:
      return optuna.load_study(study_name=info.study_name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
      raise ConfigError(f'{masked(info.storage)} holds no study {info.study_name!r}') from None
  return optuna.create_study(
    storage=storage,
    study_name=info.study_name,
    sampler=sampler,
    pruner=pruner,
    direction='maximize',
    load_if_exists=True,
  )


def contains(distribution: BaseDistribution, value: Any) -> bool:
  if isinstance(distribution, CategoricalDistribution):
    return value in distribution.choices
  return distribution.low <= value <= distribution.high


def enqueue_baseline(study: optuna.Study, space: Mapping[str, BaseDistribution], config: ml_collections.ConfigDict):
  """Queues the config's own values first, so that the report compares the best with them."""
  if study.trials:
    return
  params = {field: get_field(config, field) for field in space}
  outside = [f'{field}={value!r}' for field, value in params.items() if not contains(space[field], value)]
  if outside:
    logging.info('No baseline trial: the config has %s, outside the search space', ', '.join(outside))
    return
  study.enqueue_trial(params, user_attrs={'baseline': True}, skip_if_exists=True)


# Trials.


def workdir_name(trial: optuna.Trial | FrozenTrial) -> str:
  """`trial-<n>`; a retried or requeued trial inherits the directory (user attribute) of the one it repeats."""
  return trial.user_attrs.get('workdir', f'trial-{trial.number}')


def trial_workdir(info: SweepInfo, trial: FrozenTrial) -> str:
  return os.path.join(info.workdir, workdir_name(trial))


def evaluations(workdir: str) -> dict[int, float]:
  """{step: validation accuracy} of the evaluations in `workdir`'s metrics.csv (float32, as computed)."""
  rows = writers.read_csv_rows(workdir)
  return {int(row['step']): float(np.float32(row['eval_accuracy'])) for row in rows if row.get('eval_accuracy')}


def best_validation_accuracy(workdir: str) -> float:
  """The validation accuracy of the best checkpoint: the one `--mode=evaluate` chooses."""
  with contextlib.closing(checkpoint.open_checkpoints(workdir)) as manager:  # Read-only, as --mode=evaluate.
    step = checkpoint.best_step(manager)
    if step is None:
      raise ConfigError(f'{workdir} holds no checkpoint chosen by validation accuracy')
    return float(manager.metrics(step)[checkpoint.BEST_METRIC])


class Objective:
  """Trains one trial's config in its directory, reporting each evaluation to the pruner."""

  def __init__(self, config: ml_collections.ConfigDict, space: Mapping[str, BaseDistribution], info: SweepInfo):
    self.config, self.space, self.info = config, space, info

  def __call__(self, trial: optuna.Trial) -> float:
    params = {field: suggest(trial, field, distribution) for field, distribution in self.space.items()}
    name = workdir_name(trial)
    workdir = os.path.join(self.info.workdir, name)
    steps = checkpoint_steps(workdir)
    for key, value in {'workdir': name, 'host': socket.gethostname(), 'pid': os.getpid()}.items():
      trial.set_user_attr(key, value)
    trial.set_user_attr('resumed_from_step', steps[-1] if steps else 0)
    logging.info('Trial %d in %s: %s', trial.number, workdir, params)
    reported = set()

    def report(step: int, metrics: Mapping[str, float]):
      history = evaluations(workdir)  # A resumed trial also reports the evaluations made before.
      for earlier in sorted(set(history) - reported):
        trial.report(history[earlier], earlier)
        reported.add(earlier)
      if step not in reported:
        trial.report(metrics[checkpoint.BEST_METRIC], step)
        reported.add(step)
      if trial.should_prune():
        raise optuna.TrialPruned(f'validation accuracy {metrics[checkpoint.BEST_METRIC]:.4f} at step {step}')

    try:
      trainer.train_and_evaluate(with_params(self.config, params), workdir, on_evaluation=report)
      if preemption.received_signal():  # Training stopped at a step boundary with a checkpoint.
        raise self.requeue(trial, preemption.received_signal())
      return best_validation_accuracy(workdir)
    except NonFiniteError as e:  # A diverging rate is an outcome of the trial, not an error of the sweep.
      trial.set_user_attr('error', str(e))
      raise
    except KeyboardInterrupt:  # Ctrl-C outside training's own handler (reading data, compiling, after).
      raise self.requeue(trial, 'SIGINT') from None

  @staticmethod
  def requeue(trial: optuna.Trial, signal_name: str) -> Interrupted:
    """Queues the trial again (its directory, hence its checkpoint, included) and says so."""
    trial.study.enqueue_trial(trial.params, user_attrs={**trial.user_attrs, 'requeued_from': trial.number})
    return Interrupted(
      f'{signal_name}: trial {trial.number} is saved and queued again; rerun the same command to resume the sweep'
    )


def checkpoint_steps(workdir: str) -> list[int]:
  directory = os.path.join(workdir, 'checkpoints')
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit()) if os.path.isdir(directory) else []


def state_counts(study: optuna.Study) -> collections.Counter:
  return collections.Counter(trial.state for trial in study.get_trials(deepcopy=False))


def run_worker(study: optuna.Study, objective: Objective, trials: int, heartbeat_seconds: int) -> None:
  """Runs trials until `trials` are finished; waits while the last ones run elsewhere, to retry any
  whose worker dies (Optuna fails it after the grace period and queues it again)."""
  while True:
    optuna.storages.fail_stale_trials(study)
    counts = state_counts(study)
    finished = sum(counts[state] for state in FINISHED)
    if finished >= trials:
      return
    if finished + counts[TrialState.RUNNING] >= trials and not counts[TrialState.WAITING]:
      time.sleep(heartbeat_seconds)
      continue
    study.optimize(objective, n_trials=1, catch=(NonFiniteError,))


# The command.


def check_same_sweep(info: SweepInfo) -> None:
  """A workdir holds one sweep: another study's trials would resume its trial directories."""
  if not os.path.exists(os.path.join(info.workdir, SWEEP_JSON)):
    return
  saved = load_info(info.workdir)
  fields = ('storage', 'study_name', 'config_file', 'config_args', 'space_file')
  changed = [field for field in fields if getattr(saved, field) != getattr(info, field)]
  if changed:
    raise ConfigError(
      f'{info.workdir} holds the sweep {saved.study_name!r} with another {", ".join(changed)}; '
      'rerun it with the same flags, or give a new --workdir'
    )


def absolute_storage(url: str) -> str:
  """A SQLite URL with an absolute path: `--report` and the workers may run from another directory."""
  prefix = 'sqlite:///'
  if url.startswith(prefix) and not url.startswith(prefix + '/') and ':memory:' not in url:
    return prefix + os.path.abspath(url[len(prefix) :])
  return url


def trial_steps(config: ml_collections.ConfigDict) -> Steps:
  """The steps of a trial of `config`, whose data must have a validation split: a sweep chooses, and only
  by validation accuracy (reading the data here also fills a folder's cache once, before the workers)."""
  splits = data.load_splits(config.data)
  if 'validation' not in splits:
    raise ConfigError(
      'a sweep chooses by validation accuracy and this data has no validation split: set '
      '--config.data.validation_size=<images> (held out of the training images), or add a val/ folder'
    )
  return Steps.of(config, len(splits['train']))


def config_overrides(argv: list[str]) -> list[str]:
  return [cli.with_fractions(arg) for arg in argv if arg.startswith('--config.')]


def start_workers(count: int) -> list[subprocess.Popen]:
  """`count` processes running this same command as single workers; their logs go to <workdir>/logs/."""
  log_dir = os.path.join(FLAGS.workdir, 'logs')
  os.makedirs(log_dir, exist_ok=True)
  workers = []
  for index in range(count):
    command = [sys.executable, '-m', 'resnet_flax.sweep', *sys.argv[1:], '--workers=1', f'--worker_index={index}']
    with open(os.path.join(log_dir, f'worker-{index}.log'), 'a') as log:
      workers.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
    logging.info('Worker %d: pid %d, log %s', index, workers[-1].pid, log.name)
  return workers


def wait_for(workers: list[subprocess.Popen]) -> bool:
  """Waits for every worker; passes SIGTERM on to them (Ctrl-C reaches them from the terminal).
  Returns whether a stop signal came."""
  signals = []

  def forward(signum, frame):
    del frame
    signals.append(signum)
    for worker in workers:
      if signum == signal.SIGTERM and worker.poll() is None:
        worker.send_signal(signum)

  previous = {s: signal.signal(s, forward) for s in preemption.SIGNALS}
  try:
    for index, worker in enumerate(workers):
      if worker.wait() and not signals:
        logging.warning(
          'Worker %d ended with %s (its log: %s/logs/worker-%d.log); a trial it was running is retried by the '
          'others after %d s without heartbeat',
          index,
          f'signal {-worker.returncode}' if worker.returncode < 0 else f'exit code {worker.returncode}',
          FLAGS.workdir,
          index,
          2 * FLAGS.heartbeat_seconds,
        )
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  return bool(signals)


def sweep() -> None:
  for name in ('config', 'space', 'workdir'):
    if FLAGS[name].value is None:
      raise ConfigError(f'--{name} is required (or --report=<sweep workdir> alone for the report)')
  workdir = os.path.abspath(FLAGS.workdir)
  os.makedirs(workdir, exist_ok=True)
  config, space = FLAGS.config, load_space(FLAGS.space)
  check_space(space, config)
  info = SweepInfo(
    workdir=workdir,
    storage=absolute_storage(FLAGS.storage or f'sqlite:///{os.path.join(workdir, "study.db")}'),
    study_name=FLAGS.study_name or os.path.basename(workdir),
    config_file=os.path.abspath(FLAGS['config'].config_filename),
    config_args=config_overrides(sys.argv[1:]),
    space_file=os.path.abspath(FLAGS.space),
  )
  if base_config(info).to_dict() != config.to_dict():
    raise ConfigError('write the --config.<field> overrides of a sweep as --config.<field>=<value>, one argument each')
  check_same_sweep(info)
  is_worker = FLAGS.worker_index >= 0
  study = open_study(info, heartbeat_seconds=FLAGS.heartbeat_seconds, create=True)  # Storage first: fails fast.
  study.sampler = create_sampler(FLAGS.sampler, space, FLAGS.trials, sampler_seed(FLAGS.sampler_seed, study))
  study.pruner = create_pruner(FLAGS.pruner, warmup_steps=int(trial_steps(config).total * PRUNER_WARMUP))
  trials = FLAGS.trials
  if FLAGS.sampler == 'grid':
    points = math.prod(len(values) for values in grid(space).values())
    if trials > points:
      logging.info('The grid has %d points: %d trials, not %d', points, points, trials)
      trials = points
  if not is_worker:
    info.save()
    if FLAGS.baseline:
      enqueue_baseline(study, space, config)
    logging.info(
      'Study %r in %s: %d trials to finish, %d worker(s) here',
      info.study_name,
      masked(info.storage),
      trials,
      FLAGS.workers,
    )
  if FLAGS.workers > 1:
    interrupted = wait_for(start_workers(FLAGS.workers))
  else:
    try:
      run_worker(study, Objective(config, space, info), trials, FLAGS.heartbeat_seconds)
      interrupted = False
    except (Interrupted, KeyboardInterrupt) as e:
      logging.warning('Stopped by %s', e or 'SIGINT')
      interrupted = True
  if interrupted and not is_worker:
    logging.warning('The sweep stopped; rerun the same command to resume its queued trials')
  if is_worker or interrupted:
    return
  finished = sum(state_counts(study)[state] for state in FINISHED)
  if finished < trials:
    raise UserError(f'{finished} of {trials} trials finished; rerun the same command to continue the study')
  from resnet_flax import sweep_report  # It reads this module's records.

  sweep_report.write_report(workdir)


def report_only() -> None:
  from resnet_flax.sweep import report as sweep_report

  sweep_report.write_report(FLAGS.report)


def quiet_optuna_tracebacks() -> None:
  """Optuna logs a failed trial with its traceback; its one-line message says what happened."""

  def drop_traceback(record: std_logging.LogRecord) -> bool:
    record.exc_info, record.exc_text = None, None
    return True

  for handler in std_logging.getLogger('optuna').handlers:  # Records of its modules' loggers reach these.
    handler.addFilter(drop_traceback)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  mode = report_only if FLAGS.report else sweep
  quiet_optuna_tracebacks()
  cli.run(mode, FLAGS.compilation_cache_dir, coordinator_address=None, num_processes=None, process_id=None)


def define_flags() -> None:
  """The command's flags: defined only when run as `python -m resnet_flax.sweep`, so that importing this
  module (the report does) defines none twice."""
  config_flags.DEFINE_config_file('config', None, 'Training configuration file of every trial.', lock_config=True)
  flags.DEFINE_string('space', None, 'Search space: a Python file whose get_space() maps config fields to ranges.')
  flags.DEFINE_string('workdir', None, 'Directory of the sweep: trial-<n>/ runs, sweep.json, report/.')
  flags.DEFINE_integer('trials', 20, 'Trials to finish (COMPLETE or PRUNED), over all workers.', lower_bound=1)
  flags.DEFINE_string(
    'storage', '', 'Optuna RDB URL (default sqlite:///<workdir>/study.db); postgresql://... to share.'
  )
  flags.DEFINE_string('study_name', '', 'Name of the study in the storage (default: the workdir basename).')
  flags.DEFINE_integer('workers', 1, 'Worker processes on this machine, one trial each at a time.', lower_bound=1)
  flags.DEFINE_enum('sampler', 'tpe', ['tpe', 'random', 'grid'], 'How trials choose their values.')
  flags.DEFINE_enum('pruner', 'median', ['median', 'hyperband', 'none'], 'How unpromising trials are stopped early.')
  flags.DEFINE_integer('sampler_seed', 0, 'Seed of the sampler (each worker adds its index).')
  flags.DEFINE_integer(
    'heartbeat_seconds', 30, 'A trial silent for twice this long is failed and retried.', lower_bound=1
  )
  flags.DEFINE_bool('baseline', True, "Queue the config's own values as the first trial (the report compares with it).")
  flags.DEFINE_string('report', None, 'Only write the report of this sweep workdir.')
  flags.DEFINE_string(
    'compilation_cache_dir', os.path.expanduser('~/.cache/resnet_flax/jax'), 'Persistent XLA compilation cache.'
  )
  flags.DEFINE_integer('worker_index', -1, 'Set by the sweep for the worker processes it starts.')


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
