"""Fine-tuning: a new run that starts from the weights of another run (`init_from`).

`apply_init_from` restores only the weights of the source run's checkpoint through the one restore
sequence evaluation uses too (`models.trained.restore_workdir`: a partial restore into the source
model's own abstract variables; its EMA of the weights when it kept one; never the optimizer state),
then puts them into this run's freshly initialised variables (`transplant`):

- every leaf (parameters and BatchNorm statistics) whose path and shape match is copied;
- the classifier (`models.HEAD`) is matched by class name: the kernel columns and bias entries of the
  classes both runs have are copied, those of classes new to this run keep their fresh initialisation,
  those of classes this run lacks are dropped;
- any other difference (a leaf on one side only, or of another shape) is another architecture: one
  ConfigError names the first such path and both shapes.

Restoring into the source's own structure and reshaping afterwards keeps Orbax out of the surgery (a
partial restore into a target whose head changed fails: orbax#331). Hand-written: the surgery is ~40
lines over flat dicts, and no library does it for linen variables.

The images may have another size: no weight depends on it (convolutions slide, BatchNorm is per
channel, the classifier follows global average pooling). How well features learnt at one scale serve
at another is another matter.

Normalisation: a fine-tuned run keeps the source's pixel mean/std (its run.json), not its own data's,
as timm and torchvision keep the pretrained weights' mean/std. The first convolution and every
BatchNorm running statistic were fit to inputs normalised that way: other statistics shift every
activation from the first step on, and with a frozen backbone (BN in inference mode) for the whole
run. The new run.json records the source's values, so its evaluation and prediction use them too.

Resuming: the workdir's own checkpoints win. `init_from` is not applied again (a log line says so), and
a fine-tuned run keeps the normalisation and the `init_from` record of its run.json.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from resnet_flax import data, models
from resnet_flax.errors import ConfigError
from resnet_flax.models import trained
from resnet_flax.run import checkpoint, distributed
from resnet_flax.run.workdir import CONFIG_FILE, RUN_FILE, read_run_json

LeafPath = tuple[str, ...]  # A leaf of flattened variables: ('params', 'stem_conv', 'kernel').


class Start(NamedTuple):
  """What a run starts from."""

  variables: dict[str, Any]  # {'params', 'batch_stats'}.
  pixel_mean: tuple[float, ...]
  pixel_std: tuple[float, ...]
  init_from: dict[str, Any] | None  # run.json's record of the weights' source: {'path', 'step'}.


def apply_init_from(
  config: ml_collections.ConfigDict,
  workdir: str,
  variables: dict[str, Any],
  class_names: Sequence[str],
  pixel_mean: Sequence[float],
  pixel_std: Sequence[float],
) -> Start:
  """The start of the run in `workdir`: the freshly initialised `variables` and this run's normalisation,
  or with `config.init_from` the source's weights put into `variables` and the source's normalisation.

  Runs before any training, so a bad `init_from` stops the run with one line.
  """
  fresh = Start(variables, tuple(pixel_mean), tuple(pixel_std), None)
  if _has_checkpoints(workdir):
    return _resumed(config, workdir, fresh)
  if not config.init_from:
    if config.optim.freeze == 'backbone':
      logging.warning('optim.freeze=backbone without init_from: training a classifier on random features')
    return fresh
  source_dir, step, run, source = restore_source(config)
  fresh_leaves = flax.traverse_util.flatten_dict(jax.device_get(variables))
  mismatch = first_mismatch(source, fresh_leaves)
  if mismatch:
    path, there, here = mismatch
    describe = lambda shape: 'absent' if shape is None else f'of shape {shape}'
    raise ConfigError(
      f'--config.init_from={config.init_from!r} is another architecture (model.name {run.config.model.name!r} '
      f'there, {config.model.name!r} here): {"/".join(path)} is {describe(there)} there and {describe(here)} '
      f'here; fine-tune the model of {os.path.join(source_dir, CONFIG_FILE)}'
    )
  merged, reinitialised = transplant(source, fresh_leaves, run.info.class_names, class_names)
  num_params = models.count_params(variables['params'])
  logging.info(
    'Fine-tuning from %s, step %d (its %s): copied %s parameters and the BatchNorm statistics, '
    're-initialised %s (the classifier weights of %d classes new to this run); %d of its classes are dropped',
    source_dir,
    step,
    'EMA of the weights' if run.config.ema_decay > 0 else 'weights',
    f'{num_params - reinitialised:,}',
    f'{reinitialised:,}',
    len(set(class_names) - set(run.info.class_names)),
    len(set(run.info.class_names) - set(class_names)),
  )
  variables = jax.tree.map(jnp.asarray, merged)
  return Start(variables, run.info.pixel_mean, run.info.pixel_std, {'path': source_dir, 'step': step})


def restore_source(config: ml_collections.ConfigDict) -> tuple[str, int, trained.TrainedRun, dict[LeafPath, Any]]:
  """The workdir, step, run and flattened weights (host arrays) of the checkpoint `init_from` names."""
  source_dir, restored = restore_run(config.init_from, config.init_from_checkpoint, 'init_from', config)
  return source_dir, restored.step, restored.run, flax.traverse_util.flatten_dict(jax.device_get(restored.variables))


def restore_run(path: str, choice: str, field: str, config: ml_collections.ConfigDict) -> tuple[str, trained.Restored]:
  """The workdir of the run `path` names (`locate`) and the weights evaluation uses of its checkpoint
  `choice` (best | latest | a step), replicated over all devices. `field` is the config field of
  `path` (init_from, distill.teacher), `<field>_checkpoint` that of `choice`; `config` supplies the
  fields the run's config.json predates."""
  workdir, step_of_dir = locate(path, field)
  choice = _step_choice(path, choice, step_of_dir, field)
  try:
    mesh = distributed.create_mesh()
    return workdir, trained.restore_workdir(workdir, config, choice, mesh, field=f'{field}_checkpoint')
  except checkpoint.NoCheckpointError:
    raise ConfigError(
      f'--config.{field}={path!r}: {workdir} has no checkpoint; train it first or point {field} at a trained run'
    ) from None


def locate(path: str, field: str = 'init_from') -> tuple[str, int | None]:
  """The workdir of `path` (a trained run's workdir, or a checkpoint directory inside its
  `checkpoints/`, found by walking up to its run.json) and, for a checkpoint directory, its step.
  `field` is the config field that holds `path`, for errors."""
  given = os.path.abspath(path)
  where = "a trained run's workdir or one of its checkpoints (<workdir>/checkpoints/<step>)"
  if not os.path.exists(given):
    raise ConfigError(f'--config.{field}={path!r} does not exist: point it at {where}')
  workdir = given
  while not os.path.isfile(os.path.join(workdir, RUN_FILE)):
    if os.path.dirname(workdir) == workdir:
      raise ConfigError(
        f'--config.{field}={path!r} holds no trained run (no {RUN_FILE} in or above it): point it at {where}'
      )
    workdir = os.path.dirname(workdir)
  inside = os.path.relpath(given, workdir).split(os.sep)
  if inside == ['.'] or inside == ['checkpoints']:
    return workdir, None
  if inside[0] == 'checkpoints' and inside[1].isdigit():
    return workdir, int(inside[1])
  raise ConfigError(f'--config.{field}={path!r} is inside the run {workdir} but not a checkpoint: point it at {where}')


def _step_choice(path: str, choice: str, step_of_dir: int | None, field: str) -> str:
  """`choice` (`<field>_checkpoint`), or the step of the checkpoint directory `path` names."""
  if step_of_dir is None:
    return choice
  if choice not in ('best', str(step_of_dir)):
    raise ConfigError(
      f'--config.{field}={path!r} is the checkpoint of step {step_of_dir}, but '
      f'--config.{field}_checkpoint={choice!r} names another: point {field} at the workdir, or leave '
      f'{field}_checkpoint at best'
    )
  return str(step_of_dir)


def transplant(
  source: dict[LeafPath, Any], fresh: dict[LeafPath, Any], source_classes: Sequence[str], classes: Sequence[str]
) -> tuple[dict[str, Any], int]:
  """The `fresh` variables (flattened, host arrays) with every leaf of `source`, the classifier's
  columns matched by class name, nested again; and how many parameters keep their fresh values.

  The architectures must agree (`first_mismatch`).
  """
  in_source = [(ours, data.class_index(name, source_classes)) for ours, name in enumerate(classes)]
  shared = [(ours, theirs) for ours, theirs in in_source if theirs is not None]
  rows = np.array(shared, np.intp).reshape(-1, 2)  # (this run's class index, the source's), per shared class.
  merged, reinitialised = {}, 0
  for path, value in fresh.items():
    if _is_head(path):
      value = np.array(value)  # A writable copy: the fresh columns of new classes stay.
      value[..., rows[:, 0]] = source[path][..., rows[:, 1]]
      reinitialised += value.size // value.shape[-1] * (value.shape[-1] - len(rows))
      merged[path] = value
    else:
      merged[path] = np.asarray(source[path], value.dtype)
  return flax.traverse_util.unflatten_dict(merged), reinitialised


def first_mismatch(
  source: dict[LeafPath, Any], fresh: dict[LeafPath, Any]
) -> tuple[LeafPath, tuple[int, ...] | None, tuple[int, ...] | None] | None:
  """The first leaf (path, shape in `source`, shape in `fresh`; None where absent), parameters before
  BatchNorm statistics, that is on one side only or has another shape; the classifier's may differ in
  its last (class) axis only."""
  paths = [*fresh, *(path for path in source if path not in fresh)]
  for path in sorted(paths, key=lambda path: path[0] != 'params'):  # A stable sort: the order within stays.
    there = source[path].shape if path in source else None
    here = fresh[path].shape if path in fresh else None
    same = there is not None and here is not None and (there[:-1] == here[:-1] if _is_head(path) else there == here)
    if not same:
      return path, there, here
  return None


def _is_head(path: LeafPath) -> bool:
  return path[:2] == ('params', models.HEAD)


def _has_checkpoints(workdir: str) -> bool:
  directory = os.path.join(workdir, 'checkpoints')
  return os.path.isdir(directory) and ocp.utils.any_checkpoint_step(directory) is not None


def _resumed(config: ml_collections.ConfigDict, workdir: str, fresh: Start) -> Start:
  """A resumed run: its checkpoints hold its weights; a fine-tuned one keeps its run.json's source's normalisation."""
  if config.init_from:
    logging.info(
      '%s holds checkpoints: resuming from them; init_from=%s is not applied again (the checkpoint wins)',
      workdir,
      config.init_from,
    )
  saved = read_run_json(workdir)
  if not saved.get('init_from'):
    return fresh
  return Start(fresh.variables, tuple(saved['pixel_mean']), tuple(saved['pixel_std']), saved['init_from'])
