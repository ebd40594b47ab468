"""Optimizers, learning-rate schedules, parameter groups, SAM and EMA, looked up by name.

`OPTIMIZERS` and `SCHEDULES` are registries, as `models.PRESETS` is: `config_checks` reads the valid
names and each optimizer's own options from them, so an unknown name, or an option the chosen
optimizer would ignore, is refused before training starts instead of falling through to a default.

Every optimizer is wrapped the same way (`create_optimizer`): parameters are labelled 'other',
'bn_scale', 'bn_bias' or 'frozen', and each group gets its own copy of the optimizer. Weight decay
applies to conv and dense kernels only, never to frozen ones. `optim.freeze='backbone'` freezes all but
the classifier (a linear probe; the train step then runs the model in inference mode, so BatchNorm
statistics stay as they are too).

The weight decay, momentum and peak learning rate come from the run's traced hyperparameters
(`train.hyperparams`), not from `config.optim`: the train step builds the optimizer from them, so one
compiled step serves every value. `Schedule` is the learning rate at a step for a given peak.

`class_weight_vector` turns `optim.class_weights` into one loss weight per class, which the train
step multiplies into each example's cross-entropy.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from resnet_flax import config_fields as rules
from resnet_flax import models
from resnet_flax.errors import ConfigError
from resnet_flax.models import layers
from resnet_flax.run.workdir import Steps

OptimConfig = ml_collections.ConfigDict  # `config.optim`.
Hyperparams = dict[str, Any]  # `train.hyperparams.of`: 'learning_rate', 'weight_decay', 'momentum'... (may be traced).
FREEZE = ('none', 'backbone')  # `optim.freeze`: train everything, or only the classifier (`models.HEAD`).


def kernel_mask(params: Any) -> Any:
  """True for conv and dense kernels: weight decay skips BatchNorm parameters and biases."""
  return flax.traverse_util.path_aware_map(lambda path, _: path[-1] == 'kernel', params)


def _decay(hparams: Hyperparams) -> optax.GradientTransformation:
  return optax.add_decayed_weights(hparams['weight_decay'], mask=kernel_mask)


def _sgd(optim: OptimConfig, hparams: Hyperparams, learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum. `weight_decay` is an L2 term added to the gradient, or with
  `decoupled_weight_decay` it shrinks the weights outside the momentum (Loshchilov & Hutter)."""
  if optim.decoupled_weight_decay:
    momentum = optax.trace(decay=hparams['momentum'], nesterov=optim.nesterov)
    return optax.chain(momentum, _decay(hparams), optax.scale_by_learning_rate(learning_rate_fn))
  sgd = optax.sgd(learning_rate_fn, momentum=hparams['momentum'], nesterov=optim.nesterov)
  return optax.chain(_decay(hparams), sgd)


def _adam(optim: OptimConfig, hparams: Hyperparams, learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
  """Adam with an L2 term added to the gradient (coupled weight decay)."""
  return optax.chain(_decay(hparams), optax.adam(learning_rate_fn, optim.b1, optim.b2))


def _adamw(optim: OptimConfig, hparams: Hyperparams, learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
  weight_decay = hparams['weight_decay']
  return optax.adamw(learning_rate_fn, optim.b1, optim.b2, weight_decay=weight_decay, mask=kernel_mask)


# Muon's conv kernels [kh, kw, in, out] as matrices [kh * kw * in, out], airbench94_muon's flattening.
CONV_AS_MATRIX = optax.contrib.MuonDimensionNumbers(reduction_axis=(0, 1, 2), output_axis=(3,))


def muon_labels(params: Any) -> Any:
  """'muon' for the hidden conv kernels (4-D, all but the stem), 'sgd' for the rest: BatchNorm, biases, the
  stem and the classifier (airbench94_muon's split). Leaves another group holds (optax's MaskedNode) are 'sgd'."""

  def label(path, leaf):
    hidden_conv = getattr(leaf, 'ndim', 0) == 4 and path[0] != models.STEM
    return 'muon' if hidden_conv else 'sgd'

  return flax.traverse_util.path_aware_map(label, params)


def _scale_by_width(updates: Any, params: Any = None) -> Any:
  """An orthogonalised kernel's update times sqrt(max(1, fan_out / fan_in)), Muon's width scaling (as
  `optax.contrib.muon` does, whose `scale_by_shape` is not public): more than 1 only where a kernel widens
  (a 1x1 projection shortcut)."""
  widening = lambda u: jnp.sqrt(max(1.0, u.shape[-1] / math.prod(u.shape[:-1])))
  return jax.tree.map(lambda u: u * widening(u), updates)


def _muon(optim: OptimConfig, hparams: Hyperparams, learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
  """Muon (Jordan et al. 2024; airbench94_muon) on the hidden conv kernels, `_sgd` on the rest: the kernels'
  momentum is orthogonalised by optax's Newton-Schulz (`scale_by_muon`, a kernel flattened by CONV_AS_MATRIX),
  width-scaled, decayed outside it (decoupled, as optax's Muon; the SGD groups' decay stays an L2 term) and
  scaled by `muon_lr_multiplier` x the schedule. Its own `multi_transform`: `optax.contrib.muon` would give
  every non-2-D parameter, so every conv kernel, Adam instead."""
  muon = optax.chain(
    optax.contrib.scale_by_muon(
      beta=hparams['momentum'],
      nesterov=optim.nesterov,
      weight_dimension_numbers=lambda params: jax.tree.map(lambda _: CONV_AS_MATRIX, params),
    ),
    optax.stateless(_scale_by_width),
    optax.add_decayed_weights(hparams['weight_decay']),
    optax.scale_by_learning_rate(lambda step: optim.muon_lr_multiplier * learning_rate_fn(step)),
  )
  return optax.multi_transform({'muon': muon, 'sgd': _sgd(optim, hparams, learning_rate_fn)}, muon_labels)


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """An entry of `OPTIMIZERS`."""

  make: Callable[[OptimConfig, Hyperparams, optax.Schedule], optax.GradientTransformation]
  options: tuple[str, ...]  # The optimizer-specific `optim.*` fields (of OPTION_DEFAULTS) it reads.
  sharpness_aware: bool = False  # The train step takes the gradient at SAM's ascent point (`sam_gradients`).


_SGD_OPTIONS = ('momentum', 'nesterov', 'decoupled_weight_decay')
OPTIMIZERS: dict[str, Optimizer] = {
  'sgd': Optimizer(_sgd, _SGD_OPTIONS),
  'sam': Optimizer(_sgd, (*_SGD_OPTIONS, 'sam_rho', 'sam_adaptive'), sharpness_aware=True),
  'adam': Optimizer(_adam, ('b1', 'b2')),
  'adamw': Optimizer(_adamw, ('b1', 'b2')),
  'muon': Optimizer(_muon, ('momentum', 'nesterov', 'muon_lr_multiplier')),
}
# The optimizer-specific fields at their configs/default.py values: an optimizer that does not read
# one of them refuses any other value (config_checks), rather than ignoring it.
OPTION_DEFAULTS = {
  'momentum': 0.9,
  'nesterov': True,
  'decoupled_weight_decay': False,
  'b1': 0.9,
  'b2': 0.999,
  'sam_rho': 0.05,
  'sam_adaptive': False,
  'muon_lr_multiplier': 0.5,
}


def ignored_options(optim: OptimConfig) -> list[str]:
  """The optimizer-specific fields set away from their default that `optim.name` does not read."""
  used = OPTIMIZERS[optim.name].options
  return [name for name, default in OPTION_DEFAULTS.items() if name not in used and optim[name] != default]


def param_labels(params: Any, freeze: str = 'none') -> Any:
  """'frozen' for a whitening stem (and, with freeze='backbone', for everything but the classifier),
  'bn_scale' / 'bn_bias' for BatchNorm parameters, 'other' for the rest."""

  def label(path, _):
    if path[0] == layers.WHITENING or (freeze == 'backbone' and path[0] != models.HEAD):
      return 'frozen'
    is_norm = any('norm' in part.lower() for part in path[:-1])
    return f'bn_{path[-1]}' if is_norm and path[-1] in ('scale', 'bias') else 'other'

  return flax.traverse_util.path_aware_map(label, params)


def create_optimizer(
  optim: OptimConfig, learning_rate_fn: optax.Schedule, hparams: Hyperparams | None = None
) -> optax.GradientTransformation:
  """The optimizer of `optim.name` for each parameter group of `param_labels`, at the rates of
  `learning_rate_fn`, with the weight decay and momentum of `hparams` (`train.hyperparams.of`; traced in the
  train step), else of `optim`.

  BatchNorm scales may be frozen and BN biases get their own rate (airbench's speed tricks). A
  whitening stem is always frozen, and with `optim.freeze='backbone'` all but the classifier is:
  neither the gradient nor weight decay moves a frozen parameter (`set_to_zero` replaces its update).
  """
  make = OPTIMIZERS[optim.name].make
  hparams = hparams or {'weight_decay': optim.weight_decay, 'momentum': optim.momentum}
  bias_lr = lambda step: optim.bn_bias_lr_multiplier * learning_rate_fn(step)
  groups = {
    'other': make(optim, hparams, learning_rate_fn),
    'bn_scale': optax.set_to_zero() if optim.bn_scale_frozen else make(optim, hparams, learning_rate_fn),
    'bn_bias': make(optim, hparams, bias_lr),
    'frozen': optax.set_to_zero(),
  }
  return optax.multi_transform(groups, functools.partial(param_labels, freeze=optim.freeze))


# Schedules: linear warmup from 0 to the peak within the run's steps, then the decay of `optim.schedule`.

WARMUP_CLIP_FRACTION = 0.2  # A warmup as long as the run shrinks to this share of it (quick's is 1/6).


Peak = float | jax.Array  # The peak learning rate: traced in the train step.


def _cosine(optim: OptimConfig, peak: Peak, steps: Steps, warmup_steps: int) -> optax.Schedule:
  """Cosine decay to 0 over the steps after the warmup."""
  return optax.cosine_decay_schedule(peak, steps.total - warmup_steps)


def _onecycle(optim: OptimConfig, peak: Peak, steps: Steps, warmup_steps: int) -> optax.Schedule:
  """Linear decay to 0 at the last step."""
  return optax.linear_schedule(peak, 0.0, steps.total - warmup_steps)


def _step(optim: OptimConfig, peak: Peak, steps: Steps, warmup_steps: int) -> optax.Schedule:
  """Multiplied by `step_gamma` at each of `step_epochs`."""
  boundaries = {steps.at_epoch(epoch) - warmup_steps: optim.step_gamma for epoch in optim.step_epochs}
  return optax.piecewise_constant_schedule(peak, boundaries)


# `optim.schedule`: the decay after the warmup from the peak rate, given the run's steps and the warmup's.
SCHEDULES: dict[str, Callable[[OptimConfig, Peak, Steps, int], optax.Schedule]] = {
  'cosine': _cosine,
  'onecycle': _onecycle,
  'step': _step,
}


def warmup_steps(optim: OptimConfig, steps: Steps) -> int:
  """The steps of `optim.warmup_epochs`; one as long as the run is clipped to WARMUP_CLIP_FRACTION of it, and
  says so: it would leave no step at the peak rate."""
  warmup = steps.at_epoch(optim.warmup_epochs)
  if warmup < steps.total:
    return warmup
  clipped = int(WARMUP_CLIP_FRACTION * steps.total)
  logging.warning(
    'optim.warmup_epochs=%g is as long as the whole run (%d steps): warming up over its first %d steps instead; '
    'set --config.optim.warmup_epochs below num_epochs to choose',
    optim.warmup_epochs,
    steps.total,
    clipped,
  )
  return clipped


def create_learning_rate_fn(optim: OptimConfig, steps: Steps) -> optax.Schedule:
  """The schedule of `optim.schedule` after a linear warmup from 0 (`warmup_steps`; none when that is 0), up to
  `optim.learning_rate` (the train step takes the peak as an input instead: `Schedule.at`)."""
  return Schedule.of(optim, steps).at(optim.learning_rate)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A run's schedule for any peak rate: `at(peak)` is the optax schedule. Hashable when `optim` is frozen, so
  that runs which differ only in their peak rate share a compiled step."""

  optim: OptimConfig
  steps: Steps
  warmup: int  # `warmup_steps`: computed (and warned of) once, at set-up.

  @classmethod
  def of(cls, optim: OptimConfig, steps: Steps) -> Schedule:
    return cls(optim, steps, warmup_steps(optim, steps))

  def at(self, peak: Peak) -> optax.Schedule:
    decay = SCHEDULES[self.optim.schedule](self.optim, peak, self.steps, self.warmup)
    if not self.warmup:  # optax warns of a linear schedule of no steps.
      return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, self.warmup), decay], [self.warmup])


def sam_gradients(grad_fn: Callable, params: Any, grads: Any, rho: float, adaptive: bool) -> Any:
  """Sharpness-aware minimisation (Foret et al. 2021): the gradient at the worst point within rho.

  Ascends to w + e with e = rho g / |g| (adaptive, Kwon et al. 2021: e = rho w^2 g / |w g|), and
  returns the gradient there. Written here rather than with `optax.contrib.sam`, whose opaque mode
  needs the loss closure threaded through the optimizer: two lines in the step are simpler.
  """
  scale = jax.tree.map(jnp.abs, params) if adaptive else jax.tree.map(jnp.ones_like, params)
  norm = optax.global_norm(jax.tree.map(jnp.multiply, scale, grads))
  ascent = jax.tree.map(lambda g, s: rho * s * s * g / (norm + 1e-12), grads, scale)
  return grad_fn(jax.tree.map(jnp.add, params, ascent))[1]


def update_ema(ema: Any, params: Any, batch_stats: Any, decay: float) -> Any:
  """ema <- decay * ema + (1 - decay) * current, for the weights and the BN statistics."""
  current = {'params': params, 'batch_stats': batch_stats}
  return optax.incremental_update(current, ema, step_size=1.0 - decay)


# Class weights.

CLASS_WEIGHT_EXAMPLE = "\"{'cat': 2.0, 'dog': 0.5}\""


def parse_class_weights(spec: str) -> str | dict[str, float]:
  """`optim.class_weights` as 'none', 'balanced' or {class name: weight > 0}; ValueError says what is wrong."""
  if spec in ('none', 'balanced'):
    return spec
  try:
    weights = ast.literal_eval(spec)
  except (ValueError, SyntaxError, TypeError):
    weights = None
  if not isinstance(weights, dict):
    raise ValueError(f'choose none, balanced or a mapping of class names to weights such as {CLASS_WEIGHT_EXAMPLE}')
  for name, weight in weights.items():
    if not isinstance(name, str):
      raise ValueError(f'class {name!r} is not a name: quote it, as in {CLASS_WEIGHT_EXAMPLE}')
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
      raise ValueError(f'the weight of {name!r} is {weight!r}: weights must be numbers > 0')
  return {name: float(weight) for name, weight in weights.items()}


def class_weight_vector(spec: str, labels: np.ndarray, class_names: Sequence[str]) -> np.ndarray | None:
  """float32 [K] loss weights of the classes, from `optim.class_weights` and the training labels.

  'balanced': w_c = n / (K n_c), scikit-learn's compute_class_weight('balanced'): inverse class
  frequency, scaled so that the weights average 1 over the training examples, which keeps the loss
  and so the learning rate on the scale of an unweighted run (a class absent from the labels gets
  1). A mapping weighs the classes it names and leaves the others at 1. 'none' gives None: the
  step then stays unweighted, the same program as without this option. Raises ConfigError naming a
  class the data lacks.
  """
  try:
    weights = parse_class_weights(spec)
  except ValueError as e:
    raise ConfigError(f'--config.optim.class_weights={spec!r} is invalid: {e}') from None
  if weights == 'none':
    return None
  if weights == 'balanced':
    counts = np.bincount(labels, minlength=len(class_names)).astype(np.float64)
    present = counts > 0
    vector = np.ones(len(class_names))
    vector[present] = len(labels) / (present.sum() * counts[present])
    return vector.astype(np.float32)
  unknown = [name for name in weights if name not in class_names]
  if unknown:
    raise ConfigError(
      f'--config.optim.class_weights names classes the training data lacks: {", ".join(map(repr, unknown))}; '
      f'name only its classes: {", ".join(class_names)}'
    )
  return np.array([weights.get(name, 1.0) for name in class_names], np.float32)


def _class_weights(v) -> str | None:
  try:
    parse_class_weights(v)
  except ValueError as e:
    return str(e)
  return None


CONFIG_RULES: dict[str, rules.Rule] = {
  'optim.name': rules.choice(OPTIMIZERS),
  'optim.learning_rate': rules.non_negative,
  'optim.momentum': rules.fraction,
  'optim.weight_decay': rules.non_negative,
  'optim.warmup_epochs': rules.non_negative,
  'optim.label_smoothing': rules.fraction,
  'optim.class_weights': _class_weights,
  'optim.schedule': rules.choice(SCHEDULES),
  'optim.step_gamma': rules.positive,
  'optim.sam_rho': rules.non_negative,
  'optim.b1': rules.fraction,
  'optim.b2': rules.fraction,
  'ema_decay': rules.fraction,
  'optim.bn_bias_lr_multiplier': rules.positive,
  'optim.muon_lr_multiplier': rules.positive,
  'optim.freeze': rules.choice(FREEZE),
}

# What a linear probe (optim.freeze='backbone': the model runs in inference mode and only the
# classifier trains) would silently ignore, at the value that does nothing.
IGNORED_BY_FROZEN_BACKBONE = {
  'model.dropout_rate': 0.0,
  'model.block_dropout_rate': 0.0,
  'model.drop_path_rate': 0.0,
  'optim.bn_bias_lr_multiplier': 1.0,
}


def check_config(config: ml_collections.ConfigDict) -> None:
  """Options that the chosen optimizer, or a frozen backbone, would silently ignore are refused."""
  for name in ignored_options(config.optim):
    users = [key for key, entry in OPTIMIZERS.items() if name in entry.options]
    raise ConfigError(
      f'--config.optim.{name}={config.optim[name]!r} does not apply to optim.name={config.optim.name!r} '
      f'(only to {", ".join(users)}); leave it at {OPTION_DEFAULTS[name]!r} or choose one of those optimizers'
    )
  if config.optim.freeze != 'backbone':
    return
  for field, inert in IGNORED_BY_FROZEN_BACKBONE.items():
    if rules.get(config, field) != inert:
      raise ConfigError(
        f'--config.{field}={rules.get(config, field)!r} does nothing with optim.freeze=backbone (the model runs '
        f'in inference mode and only the classifier trains); leave it at {inert!r} or use optim.freeze=none'
      )
