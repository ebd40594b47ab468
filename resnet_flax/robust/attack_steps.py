"""The math of the adversarial attacks: their losses, the geometry of the ε-balls, pgd_perturb and one
iteration of FGSM/PGD and of APGD, batched and jittable; `attacks` runs them.

Written here because no maintained JAX library does it: cleverhans' JAX attacks are broken, and
robustbench/autoattack are PyTorch-only. The iterations of an evaluation attack are a Python loop over
one compiled iteration (`attacks.Attacker`; XLA:CPU runs convolutions inside `lax` loops tens of times
slower, jax#12868), and `pgd_perturb` unrolls its few steps inside the training step.


The attacked function maps pixels in [0, 1] to logits and holds everything in between: the run's
normalisation and the model with BatchNorm in inference mode (auto-attack#13/#46/#55,
cifar10_challenge#22), so ε is in pixel units, the unit published tables use. Every iterate is
projected onto the ε-ball around the clean image and clipped to [0, 1] (auto-attack#86).

Each iteration records the examples its starting point misclassifies and keeps the first such iterate
(`record`): what `attacks` counts as fooled.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

LogitsFn = Callable[[jax.Array], jax.Array]  # Pixels in [0, 1], [N, H, W, C] -> logits [N, K].
TINY = 1e-12  # Keeps L2 normalisations of a zero vector finite.

# APGD's constants (Croce & Hein 2020, Algorithm 1 and section 3.2, as AutoAttack's code sets them).
APGD_MOMENTUM = 0.75  # alpha: weight of the new step against the previous one.
APGD_SUCCESS_FRACTION = 0.75  # rho: halve the step when fewer of an interval's steps raised the loss.
APGD_FIRST_INTERVAL = 0.22  # Checkpoints: the first after 22% of the iterations, ...
APGD_INTERVAL_DECREASE = 0.03  # ... each next interval 3% of them shorter, ...
APGD_MIN_INTERVAL = 0.06  # ... down to 6%.
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


# Evaluation attacks, one iteration: every iterate checked, the fooling one kept.


def wrong(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.argmax(logits, axis=-1) != labels


def select(mask: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """Per example: `a` where `mask` [N], else `b`."""
  return jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b)


def record(fooled, kept, logits, labels, x_adv):
  """Marks newly fooled examples and keeps the iterate that fooled each (the first one)."""
  newly = wrong(logits, labels) & ~fooled
  return fooled | newly, select(newly, x_adv, kept)


def pgd_step(x_adv, x, labels, fooled, kept, epsilon, step_size, *, logits_fn, norm, loss='ce'):
  """One projected gradient step; records whether its starting point fools the model."""
  _, logits, gradient = loss_and_gradient(logits_fn, loss, x_adv, labels)
  fooled, kept = record(fooled, kept, logits, labels, x_adv)
  return project(x_adv + step_size * ascent_direction(gradient, norm), x, epsilon, norm), fooled, kept


def check(x_adv, labels, fooled, kept, *, logits_fn):
  """Records whether `x_adv` fools the model (`record`), without a step."""
  return record(fooled, kept, logits_fn(x_adv), labels, x_adv)


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
  fooled, kept = record(jnp.zeros(len(x), bool), x_start, logits, labels, x_start)
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
  fooled, kept = record(s.fooled, s.kept, logits, labels, x_new)
  improved = losses > s.loss_best
  x_best, gradient_best = select(improved, x_new, s.x_best), select(improved, gradient, s.gradient_best)
  loss_best = jnp.maximum(losses, s.loss_best)
  increases = s.increases + (losses > s.loss).astype(jnp.int32)
  is_check = checkpoint_interval > 0
  halve = is_check & (
    (increases <= APGD_SUCCESS_FRACTION * checkpoint_interval)
    | (~s.reduced_at_check & (s.loss_best_at_check >= loss_best))
  )
  return ApgdState(
    x_adv=select(halve, x_best, x_new),
    x_previous=s.x_adv,  # The momentum of the next step: from here to x_adv (AutoAttack's, after a restart too).
    gradient=select(halve, gradient_best, gradient),
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
