"""Checks a config before any work, so a bad value gets one clear line instead of a traceback.

The valid names come from the registries that use them (`models.PRESETS`, `optim.OPTIMIZERS`,
`optim.SCHEDULES`, the augmentation ops, ...): one source of truth, so a name added there is valid here.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import jax
import ml_collections

from resnet_flax import data, models, optim
from resnet_flax.compress import prune, quantize
from resnet_flax.data import augment, images, input_pipeline, policies
from resnet_flax.errors import ConfigError
from resnet_flax.robust import adversarial, attacks, corruptions

DTYPES = ('float32', 'bfloat16')


def _choice(options: Collection) -> Callable[[Any], str | None]:
  """A value among `options`, read at check time: a registry (a dict) can grow after this module loads."""
  return lambda v: None if v in options else f'choose one of {", ".join(map(str, options))}'


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _positive(v) -> str | None:
  return None if _is_number(v) and v > 0 else 'must be > 0'


def _non_negative(v) -> str | None:
  return None if _is_number(v) and v >= 0 else 'must be >= 0'


def _whole_number(v) -> str | None:
  return None if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 'must be a whole number >= 0'


def _fraction(v) -> str | None:
  return None if _is_number(v) and 0 <= v < 1 else 'must be in [0, 1)'


def _probability(v) -> str | None:
  return None if _is_number(v) and 0 <= v <= 1 else 'must be in [0, 1]'


def _checkpoint_choice(v) -> str | None:
  return None if v in ('best', 'latest') or str(v).isdigit() else 'choose best, latest or a step number'


def _magnitude(v) -> str | None:
  top = policies.NUM_LEVELS - 1
  return None if _is_number(v) and 0 <= v <= top else f'must be in [0, {top}]'


def _attacks(v) -> str | None:
  if not isinstance(v, (tuple, list)) or not all(isinstance(name, str) for name in v):
    return "must be a tuple of attack names, e.g. \"('pgd20', 'apgd_ce')\""
  try:
    [attacks.parse(name) for name in v]
  except ConfigError as e:
    return str(e).removeprefix('eval.attacks: ')
  repeated = sorted({name for name in v if list(v).count(name) > 1})
  return f'{", ".join(repeated)} named more than once' if repeated else None


def _fractions_of_epsilon(v) -> str | None:
  ok = isinstance(v, (tuple, list)) and all(_is_number(f) and f > 0 for f in v)
  return None if ok else 'must be a tuple of positive multiples of eval.epsilon, e.g. (0.5, 2.0), or ()'


def _class_weights(v) -> str | None:
  try:
    optim.parse_class_weights(v)
  except ValueError as e:
    return str(e)
  return None


RULES: dict[str, Callable[[Any], str | None]] = {
  'model.name': _choice(sorted(models.PRESETS)),
  'model.max_params': _positive,
  'model.dtype': _choice(DTYPES),
  'model.dropout_rate': _fraction,
  'model.block_dropout_rate': _fraction,
  'model.se_ratio': _non_negative,
  'model.drop_path_rate': _fraction,
  'model.stem': _choice(('', *models.STEMS)),
  'model.dirac_init': _choice((False, True)),
  'data.source': _choice(sorted(data.SOURCES)),
  'data.download': _choice((False, True)),
  'data.pipeline': _choice(sorted(input_pipeline.PIPELINES)),
  'data.sampling': _choice(input_pipeline.SAMPLINGS),
  'data.train_examples': _non_negative,
  'data.validation_size': _non_negative,
  'data.image_size': lambda v: (
    None if isinstance(v, int) and v >= 0 else "must be 0 (the data's own size) or a size in pixels"
  ),
  'data.resize': _choice(images.RESIZE_POLICIES),
  'augment.crop_padding': _non_negative,
  'augment.pad_mode': _choice(augment.PAD_MODES),
  'augment.alternating_flip': _choice((False, True)),
  'augment.cutout_size': _non_negative,
  'augment.randaugment_num_ops': _non_negative,
  'augment.randaugment_magnitude': _magnitude,
  'augment.mixup_alpha': _non_negative,
  'augment.cutmix_alpha': _non_negative,
  'augment.mix_prob': _probability,
  'optim.name': _choice(optim.OPTIMIZERS),
  'optim.learning_rate': _non_negative,
  'optim.momentum': _fraction,
  'optim.weight_decay': _non_negative,
  'optim.warmup_epochs': _non_negative,
  'optim.label_smoothing': _fraction,
  'optim.class_weights': _class_weights,
  'optim.schedule': _choice(optim.SCHEDULES),
  'optim.step_gamma': _positive,
  'optim.sam_rho': _non_negative,
  'optim.b1': _fraction,
  'optim.b2': _fraction,
  'ema_decay': _fraction,
  'optim.bn_bias_lr_multiplier': _positive,
  'optim.freeze': _choice(optim.FREEZE),
  'init_from_checkpoint': _checkpoint_choice,
  'eval.checkpoint': _checkpoint_choice,
  'distill.teacher_checkpoint': _checkpoint_choice,
  'distill.alpha': _probability,
  'distill.temperature': _positive,
  'eval.tta': _choice(augment.TTA_VIEWS),
  'eval.attacks': _attacks,
  'eval.epsilon': _non_negative,
  'eval.attack_norm': _choice(attacks.NORMS),
  'eval.attack_examples': _whole_number,
  'eval.epsilon_curve': _fractions_of_epsilon,
  'eval.corruptions': corruptions.check_names,
  'eval.corruption_examples': _whole_number,
  'eval.corruption_seed': _whole_number,
  'prune.sparsity': _fraction,
  'prune.start_fraction': _fraction,
  'prune.end_fraction': _probability,
  'prune.every_steps': _positive,
  'prune.scope': _choice(prune.SCOPES),
  'quantize.mode': _choice(quantize.MODES),
  'quantize.stem': _choice((False, True)),
  'quantize.classifier': _choice((False, True)),
  'adversarial.epsilon': _non_negative,
  'adversarial.step_size': _non_negative,
  'adversarial.steps': _positive,
  'adversarial.trades_beta': _non_negative,
  'adversarial.guard_drop': _probability,
  'num_epochs': _positive,
  'batch_size': _positive,
  'eval_batch_size': _positive,
  'eval_every_epochs': _positive,
  'early_stopping_patience': _non_negative,
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
  _check_optimizer_options(config.optim)
  _check_augment_ops(config.augment)
  _check_frozen_backbone(config)
  prune.check_config(config)
  adversarial.check_config(config)
  quantize.check_config(config)
  for field in ('batch_size', 'eval_batch_size'):
    if _get(config, field) % jax.device_count():
      raise ConfigError(
        f'--config.{field}={_get(config, field)} is not divisible by the {jax.device_count()} '
        'devices; choose a multiple of the device count'
      )


def _check_optimizer_options(optim_config: ml_collections.ConfigDict) -> None:
  """An optimizer-specific option set for an optimizer that does not read it would silently do nothing."""
  for name in optim.ignored_options(optim_config):
    users = [key for key, entry in optim.OPTIMIZERS.items() if name in entry.options]
    raise ConfigError(
      f'--config.optim.{name}={optim_config[name]!r} does not apply to optim.name={optim_config.name!r} '
      f'(only to {", ".join(users)}); leave it at {optim.OPTION_DEFAULTS[name]!r} or choose one of those optimizers'
    )


def _check_augment_ops(augment_config: ml_collections.ConfigDict) -> None:
  try:
    augment.check_ops(augment_config)
  except ValueError as e:
    raise ConfigError(f'--config.augment.train_ops={augment_config.train_ops!r} is invalid: {e}') from None


# What a linear probe (optim.freeze='backbone': the model runs in inference mode and only the
# classifier trains) would silently ignore, at the value that does nothing.
IGNORED_BY_FROZEN_BACKBONE = {
  'model.dropout_rate': 0.0,
  'model.block_dropout_rate': 0.0,
  'model.drop_path_rate': 0.0,
  'optim.bn_bias_lr_multiplier': 1.0,
}


def _check_frozen_backbone(config: ml_collections.ConfigDict) -> None:
  if config.optim.freeze != 'backbone':
    return
  for field, inert in IGNORED_BY_FROZEN_BACKBONE.items():
    if _get(config, field) != inert:
      raise ConfigError(
        f'--config.{field}={_get(config, field)!r} does nothing with optim.freeze=backbone (the model runs '
        f'in inference mode and only the classifier trains); leave it at {inert!r} or use optim.freeze=none'
      )
