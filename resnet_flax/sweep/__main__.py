"""Hyperparameter sweeps: many short training runs, chosen by validation accuracy, with Optuna.

  python -m resnet_flax.sweep --config=configs/quick.py --space=sweeps/quick.py --workdir=runs/sweep \
      --trials=24 [--storage=postgresql://user:password@host/db] [--workers=2] [--sampler=tpe] [--pruner=median]
  python -m resnet_flax.sweep --report runs/sweep

Optuna does the scheduling: its RDB storage is the queue (SQLite on one machine, PostgreSQL when
several share a study), its samplers choose, its pruners stop, its heartbeats find the trials of
workers that died and `RetryHeartbeatStaleTrialCallback` queues them again. This package links it to
training: a trial is an ordinary run in `<workdir>/trial-<n>` (resumable, TensorBoard, reports) that
reports its validation accuracy at every evaluation, and a retried trial resumes the directory of the
trial it retries. Workers are processes, one trial at a time each (Optuna's `n_jobs` would be threads
sharing one JAX runtime). The test split is never seen here: a config without a validation split is
refused, and the report evaluates the chosen trial on the test split only after choosing.
"""

from __future__ import annotations

import logging as std_logging
import math
import os
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from resnet_flax import cli, data
from resnet_flax.errors import ConfigError, UserError
from resnet_flax.run.workdir import Steps
from resnet_flax.sweep import records, report, search_space, workers

FLAGS = flags.FLAGS


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


def sweep_info(workdir: str, config: ml_collections.ConfigDict) -> records.SweepInfo:
  """What `sweep.json` records of this command's flags; they must rebuild `config` (the parsed --config)."""
  info = records.SweepInfo(
    workdir=workdir,
    storage=records.absolute_storage(FLAGS.storage or f'sqlite:///{os.path.join(workdir, "study.db")}'),
    study_name=FLAGS.study_name or os.path.basename(workdir),
    config_file=os.path.abspath(FLAGS['config'].config_filename),
    config_args=config_overrides(sys.argv[1:]),
    space_file=os.path.abspath(FLAGS.space),
  )
  if records.base_config(info).to_dict() != config.to_dict():
    raise ConfigError('write the --config.<field> overrides of a sweep as --config.<field>=<value>, one argument each')
  return info


def sweep() -> None:
  for name in ('config', 'space', 'workdir'):
    if FLAGS[name].value is None:
      raise ConfigError(f'--{name} is required (or --report=<sweep workdir> alone for the report)')
  workdir = os.path.abspath(FLAGS.workdir)
  os.makedirs(workdir, exist_ok=True)
  config, space = FLAGS.config, search_space.load_space(FLAGS.space)
  search_space.check_space(space, config)
  info = sweep_info(workdir, config)
  records.check_same_sweep(info)
  is_worker = FLAGS.worker_index >= 0
  study = records.open_study(info, heartbeat_seconds=FLAGS.heartbeat_seconds, create=True)  # Storage first: fails fast.
  study.sampler = records.create_sampler(
    FLAGS.sampler, space, FLAGS.trials, records.sampler_seed(FLAGS.sampler_seed, study)
  )
  study.pruner = records.create_pruner(
    FLAGS.pruner, warmup_steps=int(trial_steps(config).total * records.PRUNER_WARMUP)
  )
  trials = FLAGS.trials
  if FLAGS.sampler == 'grid':
    points = math.prod(len(values) for values in search_space.grid(space).values())
    if trials > points:
      logging.info('The grid has %d points: %d trials, not %d', points, points, trials)
      trials = points
  if not is_worker:
    info.save()
    if FLAGS.baseline:
      records.enqueue_baseline(study, space, config)
    logging.info(
      'Study %r in %s: %d trials to finish, %d worker(s) here',
      info.study_name,
      records.masked(info.storage),
      trials,
      FLAGS.workers,
    )
  if FLAGS.workers > 1:
    interrupted = workers.wait_for(workers.start_workers(FLAGS.workers))
  else:
    try:
      workers.run_worker(study, workers.Objective(config, space, info), trials, FLAGS.heartbeat_seconds)
      interrupted = False
    except (workers.Interrupted, KeyboardInterrupt) as e:
      logging.warning('Stopped by %s', e or 'SIGINT')
      interrupted = True
  if interrupted and not is_worker:
    logging.warning('The sweep stopped; rerun the same command to resume its queued trials')
  if is_worker or interrupted:
    return
  finished = sum(workers.state_counts(study)[state] for state in workers.FINISHED)
  if finished < trials:
    raise UserError(f'{finished} of {trials} trials finished; rerun the same command to continue the study')
  report.write_report(workdir)


def report_only() -> None:
  report.write_report(FLAGS.report)


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
  """The command's flags: defined only when run as `python -m resnet_flax.sweep`, not on importing this module."""
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
