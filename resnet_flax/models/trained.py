"""A trained run, rebuilt from its workdir: its config and run.json, its model, and the weights it serves.

Training starts here for fine-tuning (the source run) and distillation (the teacher), evaluation and
the Python API restore through it too: one restore sequence, below all of them (`restore_workdir`:
`open_checkpoints` and `choose_step` of `run.checkpoint` pick the checkpoint; `restore` reads its
weights into the model).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_flax import data
from resnet_flax.data import DataError, augment
from resnet_flax.errors import ConfigError
from resnet_flax.models import create_model_from_config, init_variables
from resnet_flax.run import checkpoint
from resnet_flax.run.workdir import CONFIG_FILE, RUN_FILE, RunInfo, steps_per_epoch


@dataclasses.dataclass(frozen=True)
class TrainedRun:
  """What evaluation needs to know about the run that made a workdir's checkpoints."""

  config: ml_collections.ConfigDict  # The run's config (config.json): the model to rebuild.
  info: RunInfo  # Its run.json.


@dataclasses.dataclass(frozen=True)
class Restored:
  run: TrainedRun
  model: nn.Module
  variables: dict[str, Any]  # {'params', 'batch_stats'}, replicated over the mesh.
  step: int
  quantized: Any = None  # A `compress.quantize.Recipe`: how `model` and `variables` serve in int8; None: float.


def load_trained_run(workdir: str, config: ml_collections.ConfigDict) -> TrainedRun:
  """Reads config.json and run.json; what run.json lacks comes from the training data of config.json.

  config.json overrides `config` (the current one): a field added to the code after the run was
  saved keeps its value from `config` (usually its default) instead of failing.
  """
  paths = [os.path.join(workdir, name) for name in (CONFIG_FILE, RUN_FILE)]
  if not all(os.path.isfile(path) for path in paths):
    raise ConfigError(
      f'{workdir} holds no trained run ({CONFIG_FILE} and {RUN_FILE} are missing): '
      f'train one with --mode=train --workdir={workdir}, or point --workdir at a trained run'
    )
  config = ml_collections.ConfigDict(config.to_dict())
  with open(paths[0]) as f:
    config.update(json.load(f))
  derive = lambda saved: facts_from_training_data(config, workdir, saved['num_classes'])
  return TrainedRun(config, RunInfo.load(workdir, derive_missing_facts=derive))


def facts_from_training_data(config: ml_collections.ConfigDict, workdir: str, num_classes: int) -> dict[str, Any]:
  train_split = data.load_splits(config.data)['train']
  if len(train_split.class_names) != num_classes:
    raise DataError(
      f'the training data of {workdir} ({config.data.source} {config.data.path!r}) now has '
      f'{len(train_split.class_names)} classes but the checkpoints have {num_classes}: '
      'restore the data the model was trained on'
    )
  mean, std = augment.channel_stats(train_split.images)
  return {
    'class_names': train_split.class_names,
    'pixel_mean': mean,
    'pixel_std': std,
    'steps_per_epoch': steps_per_epoch(len(train_split), config.batch_size),
  }


def restore_workdir(
  workdir: str, config: ml_collections.ConfigDict, choice: str, mesh: Mesh, field: str = 'eval.checkpoint'
) -> Restored:
  """The weights evaluation uses (`restore`) of the checkpoint `choice` (best | latest | a step; the value of
  config field `field`) of the trained run in `workdir`, whose config.json fields `config` completes.

  The one restore sequence: `run.checkpoint.open_checkpoints` (a `NoCheckpointError` where there is none),
  `load_trained_run`, `run.checkpoint.choose_step`, `restore`.
  """
  with contextlib.closing(checkpoint.open_checkpoints(workdir)) as manager:
    run = load_trained_run(workdir, config)
    return restore(manager, run, checkpoint.choose_step(manager, choice, run.info, field=field), mesh)


def restore(manager: ocp.CheckpointManager, run: TrainedRun, step: int, mesh: Mesh) -> Restored:
  """The weights evaluation uses from checkpoint `step`, replicated over `mesh`: the EMA of the weights
  when training kept one (as the evaluation during training does), else the weights themselves.

  Only those are restored (`checkpoint.restore_subset`): the optimizer and its state play no part.
  The float model and weights, a QAT run's too (what a fine-tune starts from and a teacher runs);
  `compress.quantize.serve` turns them into what serves in int8.
  """
  config = run.config
  model = create_model_from_config(config, run.info.num_classes)
  replicated = NamedSharding(mesh, P())
  variables = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
    dict(init_variables(model, run.info.image_shape)),
  )
  if config.ema_decay > 0:
    variables = checkpoint.restore_subset(manager, {'ema': variables}, step)['ema']
  else:
    variables = checkpoint.restore_subset(manager, variables, step)
  return Restored(run, model, variables, step)
