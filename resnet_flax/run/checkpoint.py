"""Orbax checkpoints of the train state: save, keep latest + best, resume.

Kept: the latest `keep` checkpoints plus the best by validation accuracy. `AnyPreservationPolicy`
with `LatestN` can never delete the newest checkpoint (legacy `max_to_keep` + `best_fn` can,
and then a resume goes backwards).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from resnet_flax.errors import ConfigError, UserError, is_disk_full
from resnet_flax.run.workdir import RunInfo

BEST_METRIC = 'accuracy'
CORRUPT_DIR = 'checkpoints_corrupt'


class CheckpointError(UserError):
  """A checkpoint could not be written (e.g. the disk is full); the earlier ones are intact."""


class NoCheckpointError(ConfigError):
  """A workdir to restore from holds no checkpoint (`open_checkpoints`)."""


def create_manager(workdir: str, keep: int, every_steps: int) -> ocp.CheckpointManager:
  """Async manager under `workdir/checkpoints`; leftovers of interrupted saves are cleaned up."""
  best_metric = lambda metrics: metrics[BEST_METRIC]
  policy = checkpoint_managers.AnyPreservationPolicy(
    [
      checkpoint_managers.LatestN(n=keep),
      checkpoint_managers.BestN(get_metric_fn=best_metric, n=1, keep_checkpoints_without_metrics=False),
    ]
  )
  options = ocp.CheckpointManagerOptions(
    save_interval_steps=every_steps,
    preservation_policy=policy,
    best_fn=best_metric,  # Also what makes Orbax write the metrics to disk.
    best_mode='max',
    cleanup_tmp_directories=True,
    enable_async_checkpointing=True,
  )
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'), options=options)


def save(
  manager: ocp.CheckpointManager, step: int, state: Any, metrics: Mapping[str, float] | None = None, force: bool = False
) -> bool:
  """Starts an async save of `state` at `step`; `metrics` (Python floats) rank the best checkpoint.

  An earlier async save that failed raises here; a full disk becomes a one-line CheckpointError.
  """
  metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
  with _disk_errors_explained(manager, step):
    return manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=force)


def wait_until_finished(manager: ocp.CheckpointManager):
  """Blocks until the last async save is on disk (call it in a `finally`)."""
  with _disk_errors_explained(manager, manager.latest_step()):
    manager.wait_until_finished()


def close(manager: ocp.CheckpointManager):
  """Closes `manager`: a failed background write it reports again (Orbax's async checkpointer keeps its error) is the
  one-line CheckpointError too, never a traceback; the failed save is unfinished, so every listed step is intact."""
  with _disk_errors_explained(manager, None):
    manager.close()


@contextlib.contextmanager
def _disk_errors_explained(manager: ocp.CheckpointManager, step: int | None):
  """Turns 'no space left on device' from Orbax (raised directly or wrapped) into a CheckpointError."""
  try:
    yield
  except Exception as e:
    if not is_disk_full(e):
      raise
    manager.reload()
    complete = [s for s in manager.all_steps() if s != step]
    kept = f'the checkpoint of step {max(complete)} is intact' if complete else 'no earlier checkpoint exists'
    raise CheckpointError(
      f'no space left on the device while saving a checkpoint in {manager.directory} '
      f'({kept}); free some space and rerun the same command to resume'
    ) from e


def best_step(manager: ocp.CheckpointManager) -> int | None:
  """The kept step with the highest eval accuracy, if any checkpoint has one."""
  ranked = [
    (metrics[BEST_METRIC], step)
    for step in manager.all_steps()
    if (metrics := manager.metrics(step)) and BEST_METRIC in metrics
  ]
  return max(ranked)[1] if ranked else None


def restore(manager: ocp.CheckpointManager, target: Any, step: int | None = None) -> Any:
  """Restores checkpoint `step` (default: latest) into the structure, dtypes and shardings of `target`.

  `target` is abstract or concrete; an abstract target keeps optax states as their own types
  instead of dicts.
  """
  step = manager.latest_step() if step is None else step
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  logging.info('Restoring checkpoint of step %d from %s', step, manager.directory)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def restore_subset(manager: ocp.CheckpointManager, target: dict[str, Any], step: int) -> dict[str, Any]:
  """Restores only the train-state fields that `target` names (e.g. 'params', 'batch_stats', 'ema'),
  abstract arrays with the shardings to restore into, from checkpoint `step`.

  Evaluation needs neither the optimizer state nor the optimizer that shaped it, so checkpoints of any
  optimizer, with any optimizer-state layout, restore here.
  """
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  logging.info('Restoring %s of checkpoint %d from %s', ', '.join(target), step, manager.directory)
  args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
  return manager.restore(step, args=args)


def restore_latest_good(manager: ocp.CheckpointManager, target: Any) -> Any | None:
  """The newest checkpoint that restores; None if there is none.

  A checkpoint that fails to restore (truncated, corrupt) is named in a warning and moved to
  `<workdir>/checkpoints_corrupt/` (kept for inspection, never deleted), and the one before is tried.
  """
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return restore(manager, target, step)
    except Exception as e:  # Orbax raises many kinds on bad files.
      _set_aside(manager, step, e)
  return None


def _set_aside(manager: ocp.CheckpointManager, step: int, error: Exception):
  path = os.path.join(str(manager.directory), str(step))
  destination = os.path.join(os.path.dirname(str(manager.directory)), CORRUPT_DIR, str(step))
  logging.warning(
    'Checkpoint %s cannot be restored (%s: %s); moving it to %s and trying the one before.',
    path,
    type(error).__name__,
    str(error).splitlines()[0] if str(error) else '',
    destination,
  )
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    shutil.rmtree(destination, ignore_errors=True)
    shutil.move(path, destination)
  multihost_utils.sync_global_devices(f'set aside checkpoint {step}')
  manager.reload()


def open_checkpoints(workdir: str) -> ocp.CheckpointManager:
  """A read-only manager: unlike `create_manager` it never cleans up temporary directories,
  so evaluating while training runs cannot delete the save in progress."""
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  manager = None
  if os.path.isdir(directory):
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    manager = ocp.CheckpointManager(directory, options=options)
  if manager is None or not manager.all_steps():
    raise NoCheckpointError(
      f'{workdir} has no checkpoint to evaluate: train first with --mode=train '
      f'--workdir={workdir}, or point --workdir at a trained run'
    )
  return manager


def checkpoint_choice(value) -> str | None:
  """The rule of a config field that `choose_step` reads (`eval.checkpoint`, ...): best, latest or a step."""
  return None if value in ('best', 'latest') or str(value).isdigit() else 'choose best, latest or a step number'


def choose_step(manager: ocp.CheckpointManager, choice: str, info: RunInfo, field: str = 'eval.checkpoint') -> int:
  """The step of `choice`, the value of config field `field`: 'best', 'latest' or a step.

  'best' is the best by validation accuracy, and the latest where the run had no validation split
  (`info.validation`): the test split never chooses, also in workdirs whose checkpoints an earlier
  version ranked by test accuracy.
  """
  steps = manager.all_steps()
  if choice == 'latest':
    return max(steps)
  if choice == 'best':
    best = best_step(manager) if info.validation else None
    if best is None:
      logging.info('%s: the best is the latest, step %d', chosen_by(info), max(steps))
      return max(steps)
    return best
  if int(choice) not in steps:
    raise ConfigError(
      f'there is no checkpoint of step {choice} in {manager.directory}; it has steps '
      f'{sorted(steps)}: choose one of them, best or latest with --config.{field}'
    )
  return int(choice)


def chosen_by(info: RunInfo) -> str:
  """What `eval.checkpoint=best` chooses by, for reports."""
  if info.validation:
    return f'validation accuracy, on {info.validation}'
  return 'none: the run had no validation split, so best is the final checkpoint (never chosen by test accuracy)'
