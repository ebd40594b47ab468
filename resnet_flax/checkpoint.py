"""Orbax checkpoints of the train state: save, keep latest + best, resume.

Kept: the latest `keep` checkpoints plus the best by eval accuracy. `AnyPreservationPolicy`
with `LatestN` can never delete the newest checkpoint (legacy `max_to_keep` + `best_fn` can,
and then a resume goes backwards).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers

BEST_METRIC = 'accuracy'


def create_manager(workdir: str, keep: int, every_steps: int) -> ocp.CheckpointManager:
  """Async manager under `workdir/checkpoints`; leftovers of interrupted saves are cleaned up."""
  best_metric = lambda metrics: metrics[BEST_METRIC]
  policy = checkpoint_managers.AnyPreservationPolicy([
      checkpoint_managers.LatestN(n=keep),
      checkpoint_managers.BestN(get_metric_fn=best_metric, n=1, keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=every_steps,
      preservation_policy=policy,
      cleanup_tmp_directories=True,
      enable_async_checkpointing=True,
  )
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         metrics: Mapping[str, float] | None = None, force: bool = False) -> bool:
  """Starts an async save of `state` at `step`; `metrics` (Python floats) rank the best checkpoint."""
  metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
  return manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=force)


def best_step(manager: ocp.CheckpointManager) -> int | None:
  """The kept step with the highest eval accuracy, if any checkpoint has one."""
  ranked = [(metrics[BEST_METRIC], step) for step in manager.all_steps()
            if (metrics := manager.metrics(step)) and BEST_METRIC in metrics]
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
