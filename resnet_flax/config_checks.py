"""Checks a config before any work, so a bad value gets one clear line instead of a traceback."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from resnet_flax import augment, data, input_pipeline, models
from resnet_flax.errors import ConfigError

OPTIMIZERS = ('sgd', 'sam', 'adam', 'adamw')
SCHEDULES = ('cosine', 'onecycle', 'step')
DTYPES = ('float32', 'bfloat16')


def _choice(options) -> Callable[[Any], str | None]:
  return lambda v: None if v in options else f'choose one of {", ".join(map(str, options))}'


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _positive(v) -> str | None:
  return None if _is_number(v) and v > 0 else 'must be > 0'


def _non_negative(v) -> str | None:
  return None if _is_number(v) and v >= 0 else 'must be >= 0'


def _fraction(v) -> str | None:
  return None if _is_number(v) and 0 <= v < 1 else 'must be in [0, 1)'


def _augment_ops(ops) -> str | None:
  if not isinstance(ops, (tuple, list)) or not all(isinstance(op, str) for op in ops):
    return "must be a tuple of op names, e.g. \"('crop', 'flip')\""
  try:
    augment.validate_ops(ops)
  except ValueError as e:
    return str(e)
  return None


RULES: dict[str, Callable[[Any], str | None]] = {
  'model.name': _choice(sorted(models.PRESETS)),
  'model.max_params': _positive,
  'model.dtype': _choice(DTYPES),
  'model.dropout_rate': _fraction,
  'model.se_ratio': _non_negative,
  'model.drop_path_rate': _fraction,
  'model.stem': _choice(('', *models.STEMS)),
  'model.dirac_init': _choice((False, True)),
  'data.source': _choice(sorted(data.SOURCES)),
  'data.pipeline': _choice(sorted(input_pipeline.PIPELINES)),
  'data.validation_size': _non_negative,
  'augment.train_ops': _augment_ops,
  'augment.crop_padding': _non_negative,
  'augment.pad_mode': _choice(('reflect', 'constant')),
  'augment.alternating_flip': _choice((False, True)),
  'augment.cutout_size': _non_negative,
  'augment.randaugment_num_ops': _non_negative,
  'augment.randaugment_magnitude': lambda v: None if _is_number(v) and 0 <= v <= 30 else 'must be in [0, 30]',
  'augment.mixup_alpha': _non_negative,
  'augment.cutmix_alpha': _non_negative,
  'optim.name': _choice(OPTIMIZERS),
  'optim.learning_rate': _non_negative,
  'optim.momentum': _fraction,
  'optim.weight_decay': _non_negative,
  'optim.warmup_epochs': _non_negative,
  'optim.label_smoothing': _fraction,
  'optim.schedule': _choice(SCHEDULES),
  'optim.step_gamma': _positive,
  'optim.sam_rho': _non_negative,
  'optim.b1': _fraction,
  'optim.b2': _fraction,
  'ema_decay': _fraction,
  'optim.bn_bias_lr_multiplier': _positive,
  'eval.checkpoint': lambda v: (
    None if v in ('best', 'latest') or str(v).isdigit() else 'choose best, latest or a step number'
  ),
  'eval.tta': _choice(('none', 'flip', 'flip+translate')),
  'num_epochs': _positive,
  'batch_size': _positive,
  'eval_batch_size': _positive,
  'eval_every_epochs': _positive,
  'steps_per_call': _positive,
  'checkpoint_every_steps': _positive,
  'keep_checkpoints': _positive,
  'log_every_steps': _positive,
  'skip_nonfinite_updates': _choice((False, True)),
}


def _get(config: ml_collections.ConfigDict, dotted: str):
  value = config
  for part in dotted.split('.'):
    value = value[part]
  return value


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first bad field, its value and what it must be."""
  for field, rule in RULES.items():
    value = _get(config, field)
    problem = rule(value)
    if problem:
      raise ConfigError(f'--config.{field}={value!r} is invalid: {problem}')
  if config.augment.alternating_flip and 'flip' in config.augment.train_ops:
    raise ConfigError(
      "--config.augment.alternating_flip=True replaces the 'flip' op; remove 'flip' from --config.augment.train_ops"
    )
  for field in ('batch_size', 'eval_batch_size'):
    if _get(config, field) % jax.device_count():
      raise ConfigError(
        f'--config.{field}={_get(config, field)} is not divisible by the {jax.device_count()} '
        'devices; choose a multiple of the device count'
      )
