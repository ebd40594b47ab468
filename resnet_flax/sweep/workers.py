"""The workers of a sweep: the objective (a trial trained as an ordinary run, reporting each evaluation to the
pruner and queued again on a stop signal), the loop of one worker, and the worker processes of `--workers=N`."""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping

import ml_collections
import numpy as np
import optuna
from absl import flags, logging
from optuna.distributions import BaseDistribution
from optuna.trial import TrialState

from resnet_flax.errors import ConfigError, NonFiniteError
from resnet_flax.run import checkpoint, preemption, writers
from resnet_flax.sweep import records, search_space
from resnet_flax.train import trainer

FLAGS = flags.FLAGS

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class Interrupted(Exception):
  """A stop signal ended a trial; it is queued again."""


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

  def __init__(self, config: ml_collections.ConfigDict, space: Mapping[str, BaseDistribution], info: records.SweepInfo):
    self.config, self.space, self.info = config, space, info

  def __call__(self, trial: optuna.Trial) -> float:
    params = {field: search_space.suggest(trial, field, distribution) for field, distribution in self.space.items()}
    name = records.workdir_name(trial)
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
      trainer.train_and_evaluate(search_space.with_params(self.config, params), workdir, on_evaluation=report)
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
