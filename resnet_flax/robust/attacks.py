"""Adversarial attacks: FGSM, PGD with a random start, APGD-CE and APGD-DLR, in the L-inf and L2 norms,
and the robust accuracy that `--mode=evaluate --config.eval.attacks=...` reports.

Here: the attacks `eval.attacks` names (`parse`), `Attacker`, which compiles their iterations once per
model and runs an attack's iterations as a Python loop over them, and `robustness_report`. The losses,
the ε-balls, the iterations themselves (and why they are written here, not taken from a library):
`attack_steps`.

An example counts as fooled when any iterate of an attack is misclassified, as AutoAttack counts
(a clean misclassification fools every attack); its adversarial image is then that iterate. The
"AutoAttack-lite" of `apgd_ce` + `apgd_dlr` is AutoAttack's untargeted pair with one restart each
(Croce & Hein 2020); the full AutoAttack adds targeted APGD-T and FAB-T and five restarts.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from resnet_flax.errors import ConfigError
from resnet_flax.robust import attack_steps

NORMS = ('linf', 'l2')
APGD_DEFAULT_STEPS = 100  # AutoAttack's iterations per restart.


# Evaluation attacks: every iterate checked, the fooling one kept.


@dataclasses.dataclass(frozen=True)
class Attack:
  """An attack of `eval.attacks`, parsed from its name (`parse`)."""

  name: str
  kind: str  # fgsm | pgd | apgd
  steps: int
  loss: str = 'ce'  # Of attack_steps.LOSSES.

  def step_size(self, epsilon):
    """FGSM: ε (Goodfellow et al.); PGD: 2.5 ε / steps (Madry et al.); APGD: 2 ε at first, then adaptive."""
    return {'fgsm': 1.0, 'pgd': attack_steps.PGD_STEP / self.steps, 'apgd': attack_steps.APGD_FIRST_STEP}[
      self.kind
    ] * epsilon

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
    start_one = lambda key, x, epsilon: attack_steps.random_start(key, x[None], epsilon, norm)[0]
    self._start = jax.jit(jax.vmap(start_one, in_axes=(0, 0, None)))
    self._correct = jax.jit(lambda variables, x, labels: ~attack_steps.wrong(apply(variables, x), labels))
    self._check = bound(attack_steps.check)
    self._pgd_step = bound(attack_steps.pgd_step, norm=norm)
    self._apgd_start = {loss: bound(attack_steps.apgd_start, norm=norm, loss=loss) for loss in attack_steps.LOSSES}
    self._apgd_step = {loss: bound(attack_steps.apgd_step, norm=norm, loss=loss) for loss in attack_steps.LOSSES}

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
    return Result(attack_steps.select(fooled, kept, x_adv), fooled)

  def _apgd(self, variables, attack, x, labels, epsilon, keys):
    """APGD from a uniformly random start in the ball; the result is the fooling iterate, else the best."""
    fooled, _ = self._check(variables, x, labels, jnp.zeros(len(x), bool), x)
    state = self._apgd_start[attack.loss](variables, self._start(keys, x, epsilon), x, labels, epsilon)
    checkpoints = attack_steps.apgd_checkpoints(attack.steps)
    for iteration in range(1, attack.steps + 1):
      momentum = 1.0 if iteration == 1 else attack_steps.APGD_MOMENTUM  # No previous step to carry on the first.
      interval = checkpoints.get(iteration, 0)
      state = self._apgd_step[attack.loss](variables, state, x, labels, epsilon, momentum, interval)
    return Result(attack_steps.select(state.fooled, state.kept, state.x_best), fooled | state.fooled)


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
