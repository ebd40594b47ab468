"""The host side of training: dispatch the compiled steps, log, evaluate, checkpoint, stop on a signal.

Nothing here waits for the device between steps: the host reads device values (metrics, the
non-finite count) only at log, evaluation and checkpoint steps, and always through an explicit
`jax.device_get`, so a test can run the loop under `jax.transfer_guard('disallow')`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from absl import logging

from resnet_flax.compress import prune
from resnet_flax.data import input_pipeline
from resnet_flax.errors import NonFiniteError
from resnet_flax.run import checkpoint, preemption
from resnet_flax.run.workdir import Steps

TrainState = Any  # train.step.TrainState; not imported: the step is the trainer's business, this loop only calls it.


class Progress:
  """Progress lines with throughput and ETA, from host-side step counts only (no device sync)."""

  def __init__(self, start_step: int, total_steps: int, batch_size: int):
    self.total_steps, self.batch_size = total_steps, batch_size
    self.last_step, self.last_time = start_step, time.perf_counter()

  def rates(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    steps_per_sec = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    return {'steps_per_sec': steps_per_sec, 'images_per_sec': steps_per_sec * self.batch_size}

  def log(self, step: int, scalars: dict[str, float]):
    eta = (self.total_steps - step) / max(scalars['steps_per_sec'], 1e-9)
    logging.info(
      'step %d/%d (%.0f%%) loss %.4f accuracy %.4f lr %.4g | %.1f steps/s, %.0f images/s | ETA %s',
      step,
      self.total_steps,
      100 * step / self.total_steps,
      scalars['loss'],
      scalars['accuracy'],
      scalars['learning_rate'],
      scalars['steps_per_sec'],
      scalars['images_per_sec'],
      time.strftime('%H:%M:%S', time.gmtime(eta)),
    )


@dataclasses.dataclass
class EarlyStopping:
  """Ends training after `patience` evaluations without a better validation accuracy (0: never).

  Its state is the best checkpoint's step and accuracy, which the checkpoints keep: a resumed run
  rebuilds it (`resumed`) and stops where an uninterrupted run would have.
  """

  patience: int
  eval_every: int
  best_step: int = 0
  best_accuracy: float = -math.inf

  @classmethod
  def resumed(cls, patience: int, eval_every: int, manager: Any, ranks_from: int = 0) -> EarlyStopping:
    """From the best checkpoint; without one, the count of evaluations starts at `ranks_from`."""
    best = checkpoint.best_step(manager)
    if best is None:
      return cls(patience, eval_every, best_step=ranks_from)
    return cls(patience, eval_every, best, manager.metrics(best)[checkpoint.BEST_METRIC])

  def evaluations_since_best(self, step: int) -> int:
    return step // self.eval_every - self.best_step // self.eval_every

  def should_stop(self, step: int) -> bool:
    return self.patience > 0 and self.evaluations_since_best(step) >= self.patience

  def update(self, step: int, accuracy: float) -> bool:
    """Records the evaluation at `step`; True when training should stop."""
    if accuracy > self.best_accuracy:
      self.best_step, self.best_accuracy = step, accuracy
    return self.should_stop(step)

  def reason(self, step: int) -> str:
    return (
      f'early stopping at step {step}: no better validation accuracy than {self.best_accuracy:.4f} (step '
      f'{self.best_step}) in {self.evaluations_since_best(step)} evaluations (early_stopping_patience={self.patience})'
    )


@dataclasses.dataclass
class TrainLoop:
  """What the steps of a run need besides the state; `run` is the loop itself."""

  config: ml_collections.ConfigDict
  steps: Steps
  pipeline: input_pipeline.InputPipeline
  train_fn: Callable  # (state, stack of batches) -> (state, metrics of the stack), compiled.
  evaluate_fn: Callable[[TrainState], dict[str, float]]
  manager: Any  # An Orbax CheckpointManager.
  writer: Any  # A clu MetricWriter.
  validates: bool  # Whether `evaluate_fn` evaluates a validation split: only then may it choose a checkpoint.
  ranks_from: int = 0  # Earlier evaluations neither rank checkpoints nor stop early (pruning: its target step).
  guard: Any = None  # adversarial.Guard: stops adversarial training at catastrophic overfitting.
  # Called with (step, metrics) after each evaluation's checkpoint is saved; what it raises ends training
  # (a sweep's pruner: resnet_flax/sweep/workers.py).
  on_evaluation: Callable[[int, dict[str, float]], None] | None = None

  def run(self, state: TrainState, start_step: int) -> dict[str, float]:
    config, steps = self.config, self.steps
    early_stopping = EarlyStopping.resumed(
      config.early_stopping_patience, steps.eval_every, self.manager, self.ranks_from
    )
    if self.validates and early_stopping.should_stop(start_step):
      logging.info('Training already ended, %s. Nothing to do.', early_stopping.reason(start_step))
      return {}
    progress = Progress(start_step, steps.total, config.batch_size)
    unlogged_metrics, eval_metrics = [], {}
    lengths = self._call_lengths(start_step)
    with preemption.StopRequest() as stop:
      batches = self.pipeline.train_batches(start_step, lengths)
      step = start_step
      for length, batch in zip(lengths, batches, strict=True):
        state, call_metrics = self.train_fn(state, batch)
        step += length
        unlogged_metrics.append(call_metrics)
        is_last = step == steps.total
        is_log_step = step % steps.log_every == 0 or is_last
        if is_log_step:
          self._log_train_metrics(state, step, unlogged_metrics, progress)
          unlogged_metrics = []
        is_eval_step = step % steps.eval_every == 0 or is_last
        ranks = is_eval_step and self.validates and step >= self.ranks_from  # Test metrics never rank.
        stopping_early = overfitting = False
        if is_eval_step:
          eval_metrics = self.evaluate_fn(state)
          self.writer.write_scalars(step, {f'eval_{k}': v for k, v in eval_metrics.items()})
          overfitting = self.guard is not None and self.guard.update(step, eval_metrics)
          ranks = ranks and not overfitting  # An overfitted model never becomes the best checkpoint.
          stopping_early = ranks and early_stopping.update(step, eval_metrics[checkpoint.BEST_METRIC])
        # With several processes, agreeing on a stop costs an all-gather: do it at log steps only.
        stopping = (is_log_step or jax.process_count() == 1) and stop.requested()
        force_save = is_last or is_eval_step or stopping
        if force_save or self.manager.should_save(step):
          self._check_finite(state)
          checkpoint.save(self.manager, step, state, metrics=eval_metrics if ranks else None, force=force_save)
        if is_eval_step and self.on_evaluation is not None:
          self.on_evaluation(step, eval_metrics)
        if overfitting:
          logging.warning('Stopped: %s.', self.guard.reason())
          break
        if stopping_early:
          logging.warning('Stopped: %s. The checkpoint of step %d is saved.', early_stopping.reason(step), step)
          break
        if stopping:
          logging.warning(
            'Stopped by %s at step %d with a checkpoint; rerun the same command to resume.', stop.signal_name, step
          )
          break
    return eval_metrics

  def _call_lengths(self, start_step: int) -> list[int]:
    """Steps per compiled call from `start_step` to the end: calls end at log, evaluation, checkpoint and
    epoch boundaries."""
    config, steps = self.config, self.steps
    ends_every = (steps.log_every, steps.eval_every, config.checkpoint_every_steps, steps.per_epoch)
    lengths = input_pipeline.call_lengths(start_step, steps.total, config.steps_per_call, ends_every)
    logging.info(
      'Training steps %d..%d (%d per epoch) in %d calls of at most %d steps',
      start_step + 1,
      steps.total,
      steps.per_epoch,
      len(lengths),
      config.steps_per_call,
    )
    return lengths

  def _log_train_metrics(self, state: TrainState, step: int, call_metrics: list, progress: Progress):
    self._check_finite(state)
    merged = functools.reduce(lambda a, b: a.merge(b), call_metrics)
    scalars = {f'train_{k}': float(v) for k, v in jax.device_get(merged.compute()).items()}
    if self.config.skip_nonfinite_updates:
      scalars['train_nonfinite_steps'] = int(jax.device_get(state.nonfinite_steps))
    if self.config.prune.sparsity:
      scalars['train_sparsity'] = prune.sparsity_report(state.params, self.config)['kernels']
    scalars.update(progress.rates(step))
    self.writer.write_scalars(step, scalars)
    progress.log(step, {k.removeprefix('train_'): v for k, v in scalars.items()})

  def _check_finite(self, state: TrainState):
    if self.config.skip_nonfinite_updates:
      return
    nonfinite_steps, first_nonfinite_step = jax.device_get((state.nonfinite_steps, state.first_nonfinite_step))
    if not nonfinite_steps:
      return
    latest = self.manager.latest_step()
    kept = f'the checkpoint of step {latest} is intact' if latest is not None else 'no checkpoint was saved'
    raise NonFiniteError(
      f'the loss became non-finite at step {int(first_nonfinite_step)} ({kept}); lower '
      '--config.optim.learning_rate, or pass --config.skip_nonfinite_updates=True to skip such steps'
    )
