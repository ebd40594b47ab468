"""Checks a config before any work, so a bad value gets one clear line instead of a traceback.

Each subpackage owns the rules of its own fields, beside the registries that give their valid values
(`models.CONFIG_RULES`, `data.checks`, `optim`, `robust.checks`, `compress.checks`), and the checks of
fields that contradict each other (`optim.check_config`, each step extension's `check_config`). They are composed
here, in the training layer: the highest layer that owns config fields (evaluation's fields take their
valid values from data, robust and the run contract), and the lowest that every entry point goes
through: `train_and_evaluate`, `lr_find`, the sweep, evaluation, predict, export and explain all
validate with `validate`, from the command line or from Python alike. One source of truth: a name
added to a registry is valid here.
"""

from __future__ import annotations

import jax
import ml_collections

from resnet_flax import config_fields as rules
from resnet_flax import models, optim, step_extensions
from resnet_flax.compress import checks as compress_checks
from resnet_flax.data import checks as data_checks
from resnet_flax.errors import ConfigError
from resnet_flax.robust import checks as robust_checks
from resnet_flax.run.checkpoint import checkpoint_choice
from resnet_flax.train import step  # noqa: F401 (registers the step extensions: their checks are composed here)


def _seed(v) -> str | None:
  """The train step takes the seed as an int32 input (`train.hyperparams`)."""
  return rules.whole_number(v) or (None if v < 2**31 else 'must be below 2**31 (the train step takes it as int32)')


# Training's own fields, and evaluation's checkpoint choice (a training run that evaluates refuses
# a bad one too, as it always has).
TRAIN_RULES: dict[str, rules.Rule] = {
  'seed': _seed,
  'init_from_checkpoint': checkpoint_choice,
  'eval.checkpoint': checkpoint_choice,
  'distill.teacher_checkpoint': checkpoint_choice,
  'distill.alpha': rules.probability,
  'distill.temperature': rules.positive,
  'num_epochs': rules.positive,
  'batch_size': rules.positive,
  'eval_batch_size': rules.positive,
  'eval_every_epochs': rules.positive,
  'early_stopping_patience': rules.non_negative,
  'steps_per_call': rules.positive,
  'checkpoint_every_steps': rules.positive,
  'keep_checkpoints': rules.positive,
  'log_every_steps': rules.non_negative,
  'skip_nonfinite_updates': rules.BOOLEAN,
  'check_memory': rules.BOOLEAN,
}

RULES: dict[str, rules.Rule] = {
  **models.CONFIG_RULES,
  **data_checks.CONFIG_RULES,
  **optim.CONFIG_RULES,
  **robust_checks.CONFIG_RULES,
  **compress_checks.CONFIG_RULES,
  **TRAIN_RULES,
}


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first bad field, its value and what it must be."""
  for field, rule in RULES.items():
    value = rules.get(config, field)
    problem = rule(value)
    if problem:
      raise ConfigError(f'--config.{field}={value!r} is invalid: {problem}')
  optim.check_config(config)
  data_checks.check_config(config)
  step_extensions.check_all(config)
  for field in ('batch_size', 'eval_batch_size'):
    if rules.get(config, field) % jax.device_count():
      raise ConfigError(
        f'--config.{field}={rules.get(config, field)} is not divisible by the {jax.device_count()} '
        'devices; choose a multiple of the device count'
      )
