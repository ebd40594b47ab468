"""Adversarial attacks: FGSM, PGD with a random start, APGD-CE and APGD-DLR, in the L-inf and L2 norms.

Written here because no maintained JAX library does it: cleverhans' JAX attacks are broken, and
robustbench/autoattack are PyTorch-only. Each attack is batched and jitted; the iterations of an
evaluation attack are a Python loop over one compiled iteration (XLA:CPU runs convolutions inside
`lax` loops tens of times slower, jax#12868), and `pgd_perturb` unrolls its few steps inside the
training step.

The attacked function maps pixels in [0, 1] to logits and holds everything in between: the run's
normalisation and the model with BatchNorm in inference mode (auto-attack#13/#46/#55,
cifar10_challenge#22), so ε is in pixel units, the unit published tables use. Every iterate is
projected onto the ε-ball around the clean image and clipped to [0, 1] (auto-attack#86).

An example counts as fooled when any iterate of an attack is misclassified, as AutoAttack counts
(a clean misclassification fools every attack); its adversarial image is then that iterate. The
"AutoAttack-lite" of `apgd_ce` + `apgd_dlr` is AutoAttack's untargeted pair with one restart each
(Croce & Hein 2020); the full AutoAttack adds targeted APGD-T and FAB-T and five restarts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from resnet_flax.errors import ConfigError

NORMS = ('linf', 'l2')
LogitsFn = Callable[[jax.Array], jax.Array]  # Pixels in [0, 1], [N, H, W, C] -> logits [N, K].
TINY = 1e-12  # Keeps L2 normalisations of a zero vector finite.

# APGD's constants (Croce & Hein 2020, Algorithm 1 and section 3.2, as AutoAttack's code sets them).
APGD_MOMENTUM = 0.75  # alpha: weight of the new step against the previous one.
APGD_SUCCESS_FRACTION = 0.75  # rho: halve the step when fewer of an interval's steps raised the loss.
APGD_FIRST_INTERVAL = 0.22  # Checkpoints: the first after 22% of the iterations, ...
APGD_INTERVAL_DECREASE = 0.03  # ... each next interval 3% of them shorter, ...
APGD_MIN_INTERVAL = 0.06  # ... down to 6%.
APGD_DEFAULT_STEPS = 100  # AutoAttack's iterations per restart.
APGD_FIRST_STEP = 2.0  # x epsilon: eta^(0).
PGD_STEP = 2.5  # x epsilon / steps: Madry et al.'s step.


# Losses, per example, in float32.


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def dlr_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Difference of logits ratio (Croce & Hein 2020, eq. 6): -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3).

  Invariant to shifting and scaling the logits, so a saturated softmax does not hide the gradient.
  Needs at least 3 classes (auto-attack#70; `parse` refuses fewer)."""
  logits = logits.astype(jnp.float32)
  ordered = jnp.sort(logits, axis=-1)
  true = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  best_other = jnp.max(jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool), -jnp.inf, logits), axis=-1)
  return -(true - best_other) / (ordered[:, -1] - ordered[:, -3] + TINY)


LOSSES = {'ce': cross_entropy, 'dlr': dlr_loss}


# Geometry of the ε-balls.


def _per_example(values: jax.Array) -> jax.Array:
  """A per-example [N] value broadcast against images [N, H, W, C]."""
  return values.reshape(-1, 1, 1, 1)


def _l2(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=(1, 2, 3)))


def project(x_adv: jax.Array, x: jax.Array, epsilon, norm: str) -> jax.Array:
  """The point of the ε-ball around `x` (per example) nearest to `x_adv`, clipped to [0, 1].

  Clipping after projecting never leaves the ball: for x in [0, 1] it moves each pixel towards x."""
  delta = x_adv - x
  if norm == 'linf':
    delta = jnp.clip(delta, -epsilon, epsilon)
  else:
    delta = delta * _per_example(jnp.minimum(1.0, epsilon / (_l2(delta) + TINY)))
  return jnp.clip(x + delta, 0.0, 1.0)


def ascent_direction(gradient: jax.Array, norm: str) -> jax.Array:
  """The steepest ascent direction of unit norm: the gradient's sign (L-inf), or the gradient normalised (L2)."""
  if norm == 'linf':
    return jnp.sign(gradient)
  return gradient / _per_example(_l2(gradient) + TINY)


def random_start(key: jax.Array, x: jax.Array, epsilon, norm: str) -> jax.Array:
  """A uniformly random point of the ε-ball around each example (L-inf: per pixel; L2: in the ball's volume)."""
  if norm == 'linf':
    return project(x + jax.random.uniform(key, x.shape, minval=-1.0, maxval=1.0) * epsilon, x, epsilon, norm)
  direction_key, radius_key = jax.random.split(key)
  direction = ascent_direction(jax.random.normal(direction_key, x.shape), 'l2')
  radius = jax.random.uniform(radius_key, (x.shape[0],)) ** (1.0 / math.prod(x.shape[1:]))
  return project(x + direction * _per_example(radius) * epsilon, x, epsilon, norm)


def loss_and_gradient(logits_fn: LogitsFn, loss: str, x: jax.Array, labels: jax.Array):
  """(per-example loss, logits, gradient of each example's loss with respect to its pixels).

  The gradient of the summed loss is each example's own: BatchNorm in inference mode keeps the
  examples of a batch independent."""

  def total(x):
    logits = logits_fn(x)
    losses = LOSSES[loss](logits, labels)
    return losses.sum(), (losses, logits)

  (_, (losses, logits)), gradient = jax.value_and_grad(total, has_aux=True)(x)
  return losses, logits, gradient


# Attacks inside the training step: the perturbed images only, unrolled (a few steps).


def pgd_perturb(
  logits_fn: LogitsFn,
  x: jax.Array,
  loss_fn: Callable[[jax.Array], jax.Array],
  key: jax.Array,
  *,
  epsilon: float,
  step_size: float,
  steps: int,
  norm: str = 'linf',
) -> jax.Array:
  """`steps` steps of projected gradient ascent on `loss_fn(logits)` (per example) from a random start;
  FGSM-RS is one step of 1.25 ε."""
  gradient_fn = jax.grad(lambda x: loss_fn(logits_fn(x)).sum())
  x_adv = random_start(key, x, epsilon, norm)
  for _ in range(steps):
    x_adv = project(x_adv + step_size * ascent_direction(gradient_fn(x_adv), norm), x, epsilon, norm)
  return jax.lax.stop_gradient(x_adv)


# Evaluation attacks: every iterate checked, the fooling one kept.


@dataclasses.dataclass(frozen=True)
class Attack:
  """An attack of `eval.attacks`, parsed from its name (`parse`)."""

  name: str
  kind: str  # fgsm | pgd | apgd
  steps: int
  loss: str = 'ce'  # Of LOSSES.

  def step_size(self, epsilon):
    """FGSM: ε (Goodfellow et al.); PGD: 2.5 ε / steps (Madry et al.); APGD: 2 ε at first, then adaptive."""
    return {'fgsm': 1.0, 'pgd': PGD_STEP / self.steps, 'apgd': APGD_FIRST_STEP}[self.kind] * epsilon

  def runs_at(self, epsilon: float, main_epsilon: float) -> bool:
    """Whether the report runs it at `epsilon`: APGD (a hundred iterations) at the main radius only."""
    return self.kind != 'apgd' or epsilon == main_epsilon


ATTACK_NAMES = 'fgsm | pgd<steps> (e.g. pgd20) | apgd_ce | apgd_dlr (optionally with <steps>, default 100)'


def parse(name: str, num_classes: int | None = None) -> Attack:
  """The attack named `name` (ATTACK_NAMES); ConfigError for an unknown name or DLR with < 3 classes."""
  if name == 'fgsm':
    return Attack(name, 'fgsm', 1)
  match = re.fullmatch(r'pgd(\d+)|apgd_(ce|dlr)(\d*)', name)
  if match is None or (match[1] and int(match[1]) < 1) or (match[3] and int(match[3]) < 1):
    raise ConfigError(f'eval.attacks: unknown attack {name!r}; choose {ATTACK_NAMES}')
  if match[1]:
    return Attack(name, 'pgd', int(match[1]))
  if match[2] == 'dlr' and num_classes is not None and num_classes < 3:
    raise ConfigError(
      f'eval.attacks: {name} needs at least 3 classes (its loss divides by the gap between the first and '
      f'third logits) but the model has {num_classes}; use apgd_ce or pgd<steps>'
    )
  return Attack(name, 'apgd', int(match[3] or APGD_DEFAULT_STEPS), match[2])


@dataclasses.dataclass(frozen=True)
class Result:
  adversarial: jax.Array  # [N, H, W, C] in [0, 1]: the fooling iterate, else the last one (the best for APGD).
  fooled: jax.Array  # [N] bool: the clean image or some iterate was misclassified.


def _wrong(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.argmax(logits, axis=-1) != labels


def _select(mask: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """Per example: `a` where `mask` [N], else `b`."""
  return jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b)


def _record(fooled, kept, logits, labels, x_adv):
  """Marks newly fooled examples and keeps the iterate that fooled each (the first one)."""
  newly = _wrong(logits, labels) & ~fooled
  return fooled | newly, _select(newly, x_adv, kept)


def pgd_step(x_adv, x, labels, fooled, kept, epsilon, step_size, *, logits_fn, norm, loss='ce'):
  """One projected gradient step; records whether its starting point fools the model."""
  _, logits, gradient = loss_and_gradient(logits_fn, loss, x_adv, labels)
  fooled, kept = _record(fooled, kept, logits, labels, x_adv)
  return project(x_adv + step_size * ascent_direction(gradient, norm), x, epsilon, norm), fooled, kept


def check(x_adv, labels, fooled, kept, *, logits_fn):
  """Records whether `x_adv` fools the model (`_record`), without a step."""
  return _record(fooled, kept, logits_fn(x_adv), labels, x_adv)


@dataclasses.dataclass
class ApgdState:
  """Per example: APGD's iterate, the previous one, the best point so far and the step size's bookkeeping."""

  x_adv: jax.Array
  x_previous: jax.Array
  gradient: jax.Array  # At x_adv.
  loss: jax.Array  # At x_adv.
  x_best: jax.Array  # Where the loss was highest ...
  gradient_best: jax.Array
  loss_best: jax.Array  # ... and that loss.
  step_size: jax.Array
  increases: jax.Array  # Steps that raised the loss since the last checkpoint.
  loss_best_at_check: jax.Array
  reduced_at_check: jax.Array  # bool: the step size was halved at the last checkpoint.
  fooled: jax.Array
  kept: jax.Array


jax.tree_util.register_dataclass(ApgdState, data_fields=[f.name for f in dataclasses.fields(ApgdState)], meta_fields=[])


def apgd_start(x_start, x, labels, epsilon, *, logits_fn, norm, loss) -> ApgdState:
  losses, logits, gradient = loss_and_gradient(logits_fn, loss, x_start, labels)
  fooled, kept = _record(jnp.zeros(len(x), bool), x_start, logits, labels, x_start)
  return ApgdState(
    x_adv=x_start,
    x_previous=x_start,
    gradient=gradient,
    loss=losses,
    x_best=x_start,
    gradient_best=gradient,
    loss_best=losses,
    step_size=jnp.full(len(x), APGD_FIRST_STEP, jnp.float32) * epsilon,
    increases=jnp.zeros(len(x), jnp.int32),
    loss_best_at_check=losses,
    # As AutoAttack's code: the first checkpoint halves only oscillating examples (the paper's condition 2
    # would also halve those whose loss did not improve since the start).
    reduced_at_check=jnp.ones(len(x), bool),
    fooled=fooled,
    kept=kept,
  )


def apgd_step(state: ApgdState, x, labels, epsilon, momentum, checkpoint_interval, *, logits_fn, norm, loss):
  """One APGD iteration (Algorithm 1): a momentum step, then at a checkpoint (`checkpoint_interval` > 0, the
  length of the interval it ends) the step size halves, restarting from the best point, for every example
  whose loss rose in at most rho of the interval's steps, or whose best loss did not improve since the
  previous checkpoint where its step size was not halved."""
  s = state
  z = project(s.x_adv + _per_example(s.step_size) * ascent_direction(s.gradient, norm), x, epsilon, norm)
  x_new = project(s.x_adv + momentum * (z - s.x_adv) + (1 - momentum) * (s.x_adv - s.x_previous), x, epsilon, norm)
  losses, logits, gradient = loss_and_gradient(logits_fn, loss, x_new, labels)
  fooled, kept = _record(s.fooled, s.kept, logits, labels, x_new)
  improved = losses > s.loss_best
  x_best, gradient_best = _select(improved, x_new, s.x_best), _select(improved, gradient, s.gradient_best)
  loss_best = jnp.maximum(losses, s.loss_best)
  increases = s.increases + (losses > s.loss).astype(jnp.int32)
  is_check = checkpoint_interval > 0
  halve = is_check & (
    (increases <= APGD_SUCCESS_FRACTION * checkpoint_interval)
    | (~s.reduced_at_check & (s.loss_best_at_check >= loss_best))
  )
  return ApgdState(
    x_adv=_select(halve, x_best, x_new),
    x_previous=s.x_adv,  # The momentum of the next step: from here to x_adv (AutoAttack's, after a restart too).
    gradient=_select(halve, gradient_best, gradient),
    loss=losses,  # Whether the next step raises the loss compares with this step's, as AutoAttack does.
    x_best=x_best,
    gradient_best=gradient_best,
    loss_best=loss_best,
    step_size=jnp.where(halve, s.step_size / 2, s.step_size),
    increases=jnp.where(is_check, 0, increases),
    loss_best_at_check=jnp.where(is_check, loss_best, s.loss_best_at_check),
    reduced_at_check=jnp.where(is_check, halve, s.reduced_at_check),
    fooled=fooled,
    kept=kept,
  )


def apgd_checkpoints(steps: int) -> dict[int, int]:
  """{iteration: length of the interval it ends}: APGD's step-size checkpoints for `steps` iterations."""
  interval = max(int(APGD_FIRST_INTERVAL * steps), 1)
  decrease, shortest = max(int(APGD_INTERVAL_DECREASE * steps), 1), max(int(APGD_MIN_INTERVAL * steps), 1)
  checkpoints, at = {}, interval
  while at <= steps:
    checkpoints[at] = interval
    interval = max(interval - decrease, shortest)
    at += interval
  return checkpoints


class Attacker:
  """The attacks on one model, compiled once: `run(variables, attack, x, labels, epsilon, key)` on a batch.

  `apply(variables, pixels)` -> logits is the attacked function (normalisation and the model in
  inference mode); the variables and ε are arguments, so one compilation serves every batch, radius
  and checkpoint."""

  def __init__(self, apply: Callable, norm: str):
    if norm not in NORMS:
      raise ConfigError(f'eval.attack_norm={norm!r}: choose one of {", ".join(NORMS)}')
    self.norm = norm
    bound = lambda fn, **kw: jax.jit(
      lambda variables, *args: fn(*args, logits_fn=functools.partial(apply, variables), **kw)
    )
    # One key per example: an example's start never depends on the batch it is in.
    start_one = lambda key, x, epsilon: random_start(key, x[None], epsilon, norm)[0]
    self._start = jax.jit(jax.vmap(start_one, in_axes=(0, 0, None)))
    self._correct = jax.jit(lambda variables, x, labels: ~_wrong(apply(variables, x), labels))
    self._check = bound(check)
    self._pgd_step = bound(pgd_step, norm=norm)
    self._apgd_start = {loss: bound(apgd_start, norm=norm, loss=loss) for loss in LOSSES}
    self._apgd_step = {loss: bound(apgd_step, norm=norm, loss=loss) for loss in LOSSES}

  def correct(self, variables, x: jax.Array, labels: jax.Array) -> jax.Array:
    """[N] bool: the clean images classified correctly."""
    return self._correct(variables, x, labels)

  def run(self, variables, attack: Attack, x: jax.Array, labels: jax.Array, epsilon: float, keys: jax.Array) -> Result:
    """`attack` on the images `x` [N, H, W, C] in [0, 1]; `keys` [N] draw each example's random start."""
    attack_fn = {'fgsm': self._fgsm, 'pgd': self._pgd, 'apgd': self._apgd}[attack.kind]
    return attack_fn(variables, attack, x, labels, jnp.float32(epsilon), keys)

  def _fgsm(self, variables, attack, x, labels, epsilon, keys):
    """One step of size ε from the clean image, no random start (Goodfellow et al. 2015)."""
    fooled = jnp.zeros(len(x), bool)
    x_adv, fooled, kept = self._pgd_step(variables, x, x, labels, fooled, x, epsilon, attack.step_size(epsilon))
    return self._finish(variables, x_adv, labels, fooled, kept)

  def _pgd(self, variables, attack, x, labels, epsilon, keys):
    """Madry et al. 2018 from a random start, step 2.5 ε / steps; the clean image is checked too."""
    fooled, kept = self._check(variables, x, labels, jnp.zeros(len(x), bool), x)
    x_adv, step_size = self._start(keys, x, epsilon), attack.step_size(epsilon)
    for _ in range(attack.steps):
      x_adv, fooled, kept = self._pgd_step(variables, x_adv, x, labels, fooled, kept, epsilon, step_size)
    return self._finish(variables, x_adv, labels, fooled, kept)

  def _finish(self, variables, x_adv, labels, fooled, kept) -> Result:
    """Checks the last iterate too; the adversarial image is the fooling iterate, else the last."""
    fooled, kept = self._check(variables, x_adv, labels, fooled, kept)
    return Result(_select(fooled, kept, x_adv), fooled)

  def _apgd(self, variables, attack, x, labels, epsilon, keys):
    """APGD from a uniformly random start in the ball; the result is the fooling iterate, else the best."""
    fooled, _ = self._check(variables, x, labels, jnp.zeros(len(x), bool), x)
    state = self._apgd_start[attack.loss](variables, self._start(keys, x, epsilon), x, labels, epsilon)
    checkpoints = apgd_checkpoints(attack.steps)
    for iteration in range(1, attack.steps + 1):
      momentum = 1.0 if iteration == 1 else APGD_MOMENTUM  # No previous step to carry on the first.
      interval = checkpoints.get(iteration, 0)
      state = self._apgd_step[attack.loss](variables, state, x, labels, epsilon, momentum, interval)
    return Result(_select(state.fooled, state.kept, state.x_best), fooled | state.fooled)


# Robust accuracy: what `--mode=evaluate --config.eval.attacks=...` reports.


@dataclasses.dataclass(frozen=True)
class Batch:
  pixels: jax.Array  # [B, H, W, C] in [0, 1].
  labels: jax.Array  # [B] model class indices.
  indices: jax.Array  # [B] each example's index in its split: the key of its random starts.
  real: np.ndarray  # [B] bool, on the host: False for padding.


def start_keys(seed: int, attack: Attack, epsilon: float, indices: jax.Array) -> jax.Array:
  """[B] keys of the random starts: a pure function of (seed, attack, ε, example), whatever the batch size
  or the other radii and attacks, so attacks and runs compare per example."""
  key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(attack.name.encode()))
  key = jax.random.fold_in(key, int(np.float32(epsilon).view(np.uint32)))
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, indices)


def on_host(values: jax.Array) -> np.ndarray:
  """A batch-sharded array, whole, on every process's host."""
  return np.asarray(multihost_utils.process_allgather(values, tiled=True))


def fooled_per_example(
  attacker: Attacker,
  variables,
  batches: Iterable[Batch],
  attacks: Sequence[Attack],
  epsilons: Sequence[float],
  main_epsilon: float,
  seed: int,
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, float]]:
  """(clean correct [N], {attack: fooled [len(epsilons), N]}, {attack: seconds}) over the real examples.

  An example fooled at a smaller ε counts as fooled at every larger one (the smaller ball lies inside
  the larger; `epsilons` ascend), so accuracy never rises with ε. Where an attack does not run
  (`Attack.runs_at`) its row holds the clean mistakes, plus what smaller radii fooled."""
  correct, fooled, seconds = [], {a.name: [] for a in attacks}, {a.name: 0.0 for a in attacks}
  for batch in batches:
    batch_correct = attacker.correct(variables, batch.pixels, batch.labels)
    correct.append(on_host(batch_correct)[batch.real])
    for attack in attacks:
      start, rows = time.perf_counter(), []
      for epsilon in epsilons:
        if not attack.runs_at(epsilon, main_epsilon):
          rows.append(~batch_correct)
          continue
        keys = start_keys(seed, attack, epsilon, batch.indices)
        rows.append(attacker.run(variables, attack, batch.pixels, batch.labels, epsilon, keys).fooled)
      fooled[attack.name].append(on_host(jnp.stack(rows, axis=1))[batch.real].T)
      seconds[attack.name] += time.perf_counter() - start
  fooled = {name: np.logical_or.accumulate(np.concatenate(rows, axis=1), axis=0) for name, rows in fooled.items()}
  return np.concatenate(correct), fooled, seconds


def robustness_report(
  attacker: Attacker, variables, batches: Iterable[Batch], eval_config: ml_collections.ConfigDict, seed: int = 0
) -> dict[str, Any]:
  """The `adversarial` entry of report.json: accuracy under each attack of `eval_config.attacks` and under
  their per-example worst case, at `eval_config.epsilon` and along the ε curve of `eval_config.epsilon_curve`
  (fractions of ε; APGD at ε only, None elsewhere)."""
  epsilon = float(eval_config.epsilon)
  epsilons = sorted({epsilon, *(epsilon * f for f in eval_config.epsilon_curve)})
  attacks = [parse(name) for name in eval_config.attacks]
  correct, fooled, seconds = fooled_per_example(attacker, variables, batches, attacks, epsilons, epsilon, seed)
  worst = np.any(np.stack(list(fooled.values())), axis=0)
  at = epsilons.index(epsilon)

  def curve(rows: np.ndarray, attack: Attack | None = None) -> list[float | None]:
    ran = [attack is None or attack.runs_at(e, epsilon) for e in epsilons]
    return [float(np.mean(~row)) if r else None for row, r in zip(rows, ran, strict=True)]

  return {
    'norm': attacker.norm,
    'epsilon': epsilon,
    'epsilon_times_255': epsilon * 255,
    'examples': len(correct),
    'clean_accuracy': float(correct.mean()),
    'accuracy': {a.name: curve(fooled[a.name], a)[at] for a in attacks},
    'worst_case_accuracy': curve(worst)[at],
    'curve': {'epsilons': epsilons, **{a.name: curve(fooled[a.name], a) for a in attacks}, 'worst_case': curve(worst)},
    'attacks': {a.name: describe(a, epsilon, seconds[a.name]) for a in attacks},
  }


def describe(attack: Attack, epsilon: float, seconds: float) -> dict[str, Any]:
  """An attack's settings, for the report."""
  step_size = attack.step_size(epsilon)
  return {
    'steps': attack.steps,
    'loss': attack.loss,
    'step_size': step_size if attack.kind != 'apgd' else f'{step_size} at first, halved adaptively',
    'random_start': attack.kind != 'fgsm',
    'restarts': 1,
    'seconds_all_epsilons': round(seconds, 2),
  }
