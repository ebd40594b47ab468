"""Adversarial training: each step attacks its own batch, then trains on the result, in the one jitted step.

`adversarial.method`, all L-inf with radius `adversarial.epsilon` (pixels in [0, 1]):
- `fgsm_rs`: Wong et al. 2020, "Fast is better than free": one signed-gradient step of 1.25 ε from a
  uniformly random start in the ball; trains on the adversarial images only. Twice the cost of a step.
- `pgd`: Madry et al. 2018: `steps` steps of 2.5 ε / steps from a random start; trains on the
  adversarial images only. (steps + 1) times the cost of a step.
- `trades`: Zhang et al. 2019: cross-entropy on the clean images + `trades_beta` x KL(f(clean) || f(adv)),
  the adversarial images maximising that KL (`steps` steps). Their code starts from a tiny Gaussian
  around the image; this starts uniformly in the ball, as the other two do.

The attack runs on the augmented (and mixed) batch in pixel space, the normalisation inside the
attacked function. For fgsm_rs and pgd it runs the model as training does (batch statistics, the
step's dropout), as Wong's and Madry's code does, but keeps none of its BatchNorm updates: the
statistics move only with the images trained on; TRADES' code attacks in inference mode, and so does
this. Its random start is a stream of its own (folded from the step's key with a number no split
reaches), so the augmentation and mixing of a step are those of plain training.

FGSM training can collapse suddenly ("catastrophic overfitting", fast_adversarial#4): robust accuracy
drops to ~0 within an epoch while clean accuracy jumps. `Guard` is Wong et al.'s early stop: at each
evaluation a PGD attack on a fixed held-out batch (the validation split's first images, else the
training split's, as theirs) and training stops when its accuracy falls `guard_drop` below the best so far
(theirs compares with the previous check, which a slow decline can pass under). Its best is not kept
across a restart: a resumed run watches from where it resumed.

The training metrics (loss, accuracy) are those of the images trained on: the adversarial ones for
fgsm_rs and pgd, the clean ones for trades.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from resnet_flax import step_extensions
from resnet_flax.data import ImageData
from resnet_flax.errors import ConfigError
from resnet_flax.robust import attack_steps, attacks

METHODS = ('none', 'fgsm_rs', 'pgd', 'trades')
FGSM_RS_STEP = 1.25  # x epsilon: Wong et al.'s step from the random start.
GUARD_ATTACK = 'pgd5'  # Wong et al.'s check: PGD with 5 steps and 1 restart.
GUARD_METRIC = 'guard_pgd_accuracy'  # In the evaluation metrics (TensorBoard eval_guard_pgd_accuracy).


ATTACK_STREAM = 2**32 - 2  # fold_in data of the attack's random start; split(step_key, 3)'s keys differ.
Objective = Callable[
  [Callable, jax.Array], Callable[[jax.Array], jax.Array]
]  # (pixel_logits, pixels) -> loss of logits.


def check_config(config: ml_collections.ConfigDict) -> None:
  adversarial = config.adversarial
  if adversarial.method not in METHODS:
    raise ConfigError(
      f'--config.adversarial.method={adversarial.method!r} is invalid: choose one of {", ".join(METHODS)}'
    )
  if adversarial.method != 'none' and not adversarial.epsilon:
    raise ConfigError(
      f'--config.adversarial.method={adversarial.method} with adversarial.epsilon=0 trains on the clean images '
      'at twice the cost or more: set a radius (e.g. --config.adversarial.epsilon=8/255) or method=none'
    )
  if adversarial.method != 'none' and config.distill.teacher:
    raise ConfigError(
      'adversarial training with distillation (distill.teacher) is not supported: the teacher would label '
      'clean images the student never trains on; set one of --config.adversarial.method=none or --config.distill.teacher='
    )


def step_size(adversarial: ml_collections.ConfigDict) -> float:
  """adversarial.step_size, or the method's own when 0."""
  if adversarial.step_size:
    return adversarial.step_size
  if adversarial.method == 'fgsm_rs':
    return FGSM_RS_STEP * adversarial.epsilon
  return attack_steps.PGD_STEP * adversarial.epsilon / adversarial.steps


def num_steps(adversarial: ml_collections.ConfigDict) -> int:
  return 1 if adversarial.method == 'fgsm_rs' else adversarial.steps


def attack_arguments(adversarial: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """The attack's radius and step, as the train step takes them (`step_extensions`: float64 rounded once)."""
  return {'epsilon': np.float32(adversarial.epsilon), 'step_size': np.float32(step_size(adversarial))}


def kl_from_clean(clean_logits: jax.Array, adversarial_logits: jax.Array) -> jax.Array:
  """Per example KL(softmax(clean) || softmax(adversarial)), in float32: TRADES' robustness term."""
  clean = jax.nn.log_softmax(clean_logits.astype(jnp.float32))
  return optax.losses.kl_divergence_with_log_targets(jax.nn.log_softmax(adversarial_logits.astype(jnp.float32)), clean)


def cross_entropy_objective(targets: jax.Array) -> Objective:
  """Madry's and Wong's attacks ascend the loss trained on: the cross-entropy with the (mixed) targets."""
  return lambda pixel_logits, pixels: lambda logits: optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def trades_objective(pixel_logits: Callable, pixels: jax.Array) -> Callable[[jax.Array], jax.Array]:
  """TRADES' attack ascends the KL from the clean prediction."""
  return functools.partial(kl_from_clean, jax.lax.stop_gradient(pixel_logits(pixels)))


def perturb(
  logits_fn: Callable[[jax.Array], jax.Array],
  images: jax.Array,
  objective: Objective,
  key: jax.Array,
  args: dict[str, jax.Array],
  steps: int,
  mean,
  std,
) -> jax.Array:
  """The adversarial version of a normalised training batch, normalised: `steps` steps of `args['step_size']`
  within `args['epsilon']` (`attack_arguments`), ascending `objective`.

  `logits_fn` maps normalised images to logits; the attack itself works in pixels in [0, 1]."""
  mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
  pixel_logits = lambda pixels: logits_fn((pixels - mean) / std)
  pixels = images * std + mean
  loss_fn = objective(pixel_logits, pixels)
  pixels = attack_steps.pgd_perturb(
    pixel_logits, pixels, loss_fn, key, epsilon=args['epsilon'], step_size=args['step_size'], steps=steps
  )
  return (pixels - mean) / std


# The step extensions.


class _Attacking(step_extensions.StepExtension):
  """What adversarial training's extensions share: the attack of a step's batch against the current weights."""

  traced_fields = ('adversarial.epsilon', 'adversarial.step_size', 'adversarial.trades_beta')

  def __init__(self, adversarial: ml_collections.ConfigDict):
    self.config, self.steps = adversarial, num_steps(adversarial)

  @classmethod
  def create(cls, config: ml_collections.ConfigDict, train_split: Any, steps: Any) -> _Attacking | None:
    return cls(config.adversarial) if config.adversarial.method in cls.methods else None

  def arguments(self) -> dict[str, np.ndarray]:
    return attack_arguments(self.config)

  def attack(
    self, args, context: step_extensions.StepContext, images: jax.Array, logits_fn: Callable, objective: Objective
  ) -> jax.Array:
    """`images` attacked, from a random start of the attack's own stream."""
    key = jax.random.fold_in(context.key, ATTACK_STREAM)
    return perturb(logits_fn, images, objective, key, args, self.steps, context.mean, context.std)


def _variables(state: Any) -> dict[str, Any]:
  return {'params': state.params, 'batch_stats': state.batch_stats}


@step_extensions.register
class AdversarialTraining(_Attacking):
  """fgsm_rs and pgd: the loss sees the batch attacked in train mode (Wong's and Madry's code), not the clean one."""

  name = 'adversarial'
  methods = ('fgsm_rs', 'pgd')

  @classmethod
  def check_config(cls, config: ml_collections.ConfigDict) -> None:
    check_config(config)

  def prepare(self, args, context, batch):
    logits_fn = lambda images: context.forward(_variables(context.state), images)[0]
    return batch._replace(
      images=self.attack(args, context, batch.images, logits_fn, cross_entropy_objective(batch.targets))
    ), None


@step_extensions.register
class Trades(_Attacking):
  """trades: the clean loss plus trades_beta x KL(clean || attacked), attacked in inference mode (their code)."""

  name = 'trades'
  methods = ('trades',)

  def arguments(self) -> dict[str, np.ndarray]:
    return {**attack_arguments(self.config), 'beta': np.float32(self.config.trades_beta)}

  def prepare(self, args, context, batch):
    logits_fn = lambda images: context.apply(_variables(context.state), images, train=False)
    return batch, self.attack(args, context, batch.images, logits_fn, trades_objective)

  def loss(self, args, context, attacked: jax.Array, loss: step_extensions.Loss) -> step_extensions.Loss:
    # The second forward pass moves the statistics on from the first, as in their code.
    logits, updates = context.forward({'params': loss.params, **loss.updates}, attacked)
    return loss._replace(value=loss.value + args['beta'] * kl_from_clean(loss.logits, logits).mean(), updates=updates)


# The catastrophic-overfitting guard.


def guard_split(splits: dict[str, ImageData], size: int) -> tuple[ImageData, str]:
  """The fixed batch the guard attacks, and what it is: the validation split's first `size` images, else
  the training split's."""
  name = 'validation' if 'validation' in splits else 'train'
  split = splits[name]
  size = min(size, len(split))
  return ImageData(split.images[:size], split.labels[:size], split.class_names), f'the first {size} {name} images'


@dataclasses.dataclass
class Guard:
  """Stops training when the PGD accuracy of the held-out batch falls `drop` below its best (0: never)."""

  drop: float
  what: str  # The batch, for the logs.
  best: float = -math.inf
  best_step: int = 0
  stopped: tuple[int, float] | None = None  # (step, accuracy) where it stopped training.

  def update(self, step: int, eval_metrics: dict[str, float]) -> bool:
    """Records the evaluation at `step`; True when training should stop."""
    accuracy = eval_metrics[GUARD_METRIC]
    logging.info(
      'Overfitting guard: %s accuracy %.4f on %s (best %.4f at step %d)',
      GUARD_ATTACK,
      accuracy,
      self.what,
      max(self.best, accuracy),
      step if accuracy > self.best else self.best_step,
    )
    if self.drop and accuracy < self.best - self.drop:
      self.stopped = (step, accuracy)
      return True
    if accuracy > self.best:
      self.best, self.best_step = accuracy, step
    return False

  def reason(self) -> str:
    step, accuracy = self.stopped
    return (
      f'catastrophic overfitting at step {step}: the {GUARD_ATTACK} accuracy of {self.what} fell from '
      f'{self.best:.4f} (step {self.best_step}) to {accuracy:.4f}, more than adversarial.guard_drop={self.drop}. '
      f'The checkpoint of step {step} is saved but never ranks as the best; evaluate an earlier one with '
      f'--config.eval.checkpoint=<step> (step {self.best_step} if it is still kept)'
    )


def guard_metric_fn(apply: Callable, epsilon: float, seed: int) -> Callable[[dict, dict], dict[str, float]]:
  """(variables, batch of uint8 images with labels and mask) -> {GUARD_METRIC: PGD accuracy}, compiled once."""
  attacker = attacks.Attacker(apply, 'linf')
  attack = attacks.parse(GUARD_ATTACK)

  def metric(variables, batch) -> dict[str, float]:
    pixels = batch['image'].astype(jnp.float32) / 255
    keys = attacks.start_keys(seed, attack, epsilon, jnp.arange(len(pixels)))
    fooled = attacker.run(variables, attack, pixels, batch['label'], epsilon, keys).fooled
    real = attacks.on_host(batch['mask']) > 0
    return {GUARD_METRIC: float(np.mean(~attacks.on_host(fooled)[real]))}

  return metric
