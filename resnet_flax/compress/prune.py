"""Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune"), written in optax.

`prune.sparsity=s` zeroes the smallest-magnitude weights of each pruned kernel, layer by layer, along
Zhu & Gupta's cubic ramp from s_i = 0: s_t = s (1 - (1 - (t - t0) / (t1 - t0))^3) for t0 <= t <= t1.
The masks are recomputed from the current weights every `prune.every_steps` steps after t0 and at t1,
then stay fixed while the rest of the run recovers. t0 and t1 are fractions of this run's steps
(`prune.start_fraction`, `prune.end_fraction`), so the same values serve a 200-epoch training and a
one-epoch fine-tune from `init_from`, whose schedule counts its own steps. At t1 every pruned kernel
of n weights holds ceil(s n) zeros: at least the target in each layer, not just on average.

`prune.scope` chooses the kernels: the conv and dense kernels of the hidden layers (`hidden`, the
default), and the stem (`stem_conv`) and the classifier (`models.HEAD`) only when asked. Both hold few
weights that all features or all classes depend on; RigL (Evci et al. 2020) keeps the first layer
dense for that reason ("a disproportional effect on the performance and almost no effect on the
total size"). Biases, BatchNorm and frozen parameters (a whitening stem, a frozen backbone) are never
pruned.

`masked` wraps the run's optimizer: its state (`PruneState`) holds the masks and the update count
beside the inner optimizer's state, so a checkpoint restores them and a resumed run continues the
ramp exactly (jaxpruner does the same, but is unmaintained and breaks on jax >= 0.6). Pitfalls of
other libraries, avoided:

- a checkpoint saved between the update and the masking is not sparse (model-optimization#205): a
  pruned weight's update here is minus the weight, so the parameters after `optax.apply_updates` are
  exactly masked, and so is every checkpoint; the train step masks the EMA of the weights, which
  evaluation uses, with the same masks (`mask_ema`);
- a resume that forgets the masks (distiller#76): they are in the optimizer state;
- sparsity read from the masks (sparseml#751): `sparsity_report` counts the exact zeros of the
  weights themselves.

A pruned weight ranks below every kept one when the masks are recomputed, so neither its gradient
nor its momentum regrows it: the set of pruned weights only grows. Evaluations before t1 neither rank
checkpoints nor count for early stopping (`first_ranked_step`): a denser model scores better, and
`best` must be a model at the target.
SAM's ascent step (`optim.sam_gradients`) perturbs pruned weights too; only its update is masked.

Anchor: jaxpruner's ResNet-50 on ImageNet at 80% sparsity, dense 76.67% -> magnitude pruning 75.53%.
Measured here (CIFAR-10 (JPEG q75), one-epoch fine-tunes of `configs/quick.py` resnet_tiny runs to 80%,
learning rate 0.1, no warmup): 69.92% -> 67.81% (benchmarks/compression.py, README), 70.36% -> 68.64%.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.traverse_util import flatten_dict, unflatten_dict

from resnet_flax import models, optim, step_extensions
from resnet_flax.errors import ConfigError
from resnet_flax.run.workdir import Steps

LeafPath = tuple[str, ...]  # A leaf of the parameters: ('ResNetBlock_0', 'Conv_0', 'kernel').
# `prune.scope`: the layers pruned besides the hidden ones, which always are.
SCOPES: dict[str, tuple[str, ...]] = {
  'hidden': (),
  'hidden+stem': (models.STEM,),
  'hidden+classifier': (models.HEAD,),
  'all': (models.STEM, models.HEAD),
}


def pruned_paths(params: Any, scope: str, freeze: str = 'none') -> list[LeafPath]:
  """The kernels `scope` prunes: conv and dense kernels the optimizer trains (`optim.param_labels`)."""
  labels = flatten_dict(optim.param_labels(params, freeze))
  spared = {models.STEM, models.HEAD} - set(SCOPES[scope])
  return [
    path for path, label in labels.items() if path[-1] == 'kernel' and label != 'frozen' and path[0] not in spared
  ]


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Zhu & Gupta's cubic ramp from no zeros at step `start` to `sparsity` at step `end`."""

  sparsity: float
  start: int
  end: int
  every: int  # Steps between mask updates.

  @classmethod
  def of(cls, prune: ml_collections.ConfigDict, steps: Steps) -> Schedule:
    """The steps of `prune.start_fraction` and `prune.end_fraction` of this run, at least one step apart."""
    start = min(round(prune.start_fraction * steps.total), steps.total - 1)
    end = min(max(round(prune.end_fraction * steps.total), start + 1), steps.total)
    return cls(prune.sparsity, start, end, prune.every_steps)

  def ramp(self, step: jax.Array) -> jax.Array:
    """The fraction of the final zeros after `step` steps: 0 until `start`, 1 from `end` on."""
    progress = jnp.clip((step - self.start) / (self.end - self.start), 0.0, 1.0)
    return 1.0 - (1.0 - progress) ** 3

  def __call__(self, step: jax.Array) -> jax.Array:
    """The scheduled sparsity after `step` steps."""
    return self.sparsity * self.ramp(step)

  def updates_masks(self, step: jax.Array) -> jax.Array:
    """Whether the update that completes `step` recomputes the masks: every `every` steps after `start`, and at `end`."""
    on_grid = ((step - self.start) % self.every == 0) | (step == self.end)
    return (step > self.start) & (step <= self.end) & on_grid

  def final_zeros(self, size: int) -> int:
    """The zeros of a pruned kernel of `size` weights from `end` on: ceil(sparsity size), float noise aside."""
    return math.ceil(round(self.sparsity * size, 6))

  def zeros(self, step: jax.Array, size: int) -> jax.Array:
    """The zeros of a pruned kernel of `size` weights after a mask update at `step`."""
    return jnp.round(self.ramp(step) * self.final_zeros(size)).astype(jnp.int32)


def magnitude_mask(weights: jax.Array, mask: jax.Array, num_zeros: jax.Array) -> jax.Array:
  """The mask (False: pruned) of the `num_zeros` smallest |weights|; those `mask` prunes already rank first."""
  score = jnp.where(mask, jnp.abs(weights), -1.0).ravel()
  keep = jnp.arange(score.size) >= num_zeros
  return jnp.zeros(score.shape, bool).at[jnp.argsort(score, stable=True)].set(keep).reshape(weights.shape)


def _kernels(tree: Any, masks: Any) -> Any:
  """The leaves of `tree` (parameters, or a tree of their shape) at the masks' paths, nested as the masks."""
  flat = flatten_dict(tree)
  return unflatten_dict({path: flat[path] for path in flatten_dict(masks)})


def _replaced(tree: Any, kernels: Any) -> Any:
  """`tree` with its leaves at the paths of `kernels` replaced by them."""
  return unflatten_dict({**flatten_dict(tree), **flatten_dict(kernels)})


def apply_masks(tree: Any, masks: Any) -> Any:
  """`tree` (parameters) with its pruned weights set to exactly 0."""
  return _replaced(tree, jax.tree.map(lambda m, w: jnp.where(m, w, 0), masks, _kernels(tree, masks)))


class PruneState(NamedTuple):
  count: jax.Array  # Updates so far: the step the schedule is at (as optax's schedules count).
  masks: Any  # Bool, False where a weight is pruned: one per pruned kernel, nested as the parameters.
  inner_state: optax.OptState


def masked(
  inner: optax.GradientTransformation, schedule: Schedule, select: Callable[[Any], list[LeafPath]]
) -> optax.GradientTransformation:
  """`inner` with the kernels `select(params)` names pruned by magnitude along `schedule`.

  Each update first recomputes the masks if `schedule.updates_masks`, ranking the weights `inner`'s
  update would give, then turns the update of every pruned weight into minus that weight: the
  parameters after `optax.apply_updates` are exactly masked.
  """

  def init(params):
    flat = flatten_dict(params)
    masks = unflatten_dict({path: jnp.ones(flat[path].shape, bool) for path in select(params)})
    return PruneState(jnp.zeros([], jnp.int32), masks, inner.init(params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError(optax.NO_PARAMS_MSG)
    updates, inner_state = inner.update(updates, state.inner_state, params)
    step = state.count + 1
    kernels, kernel_updates = _kernels(params, state.masks), _kernels(updates, state.masks)

    def recompute():
      new_mask = lambda m, w, u: magnitude_mask(w + u, m, schedule.zeros(step, w.size))
      return jax.tree.map(new_mask, state.masks, kernels, kernel_updates)

    masks = jax.lax.cond(schedule.updates_masks(step), recompute, lambda: state.masks)
    exact = jax.tree.map(lambda m, w, u: jnp.where(m, u, -w), masks, kernels, kernel_updates)
    return _replaced(updates, exact), PruneState(step, masks, inner_state)

  return optax.GradientTransformation(init, update)


def run_record(prune_config: ml_collections.ConfigDict) -> dict[str, Any] | None:
  """run.json's record of pruning (workdir.RunInfo.prune); None when it is off."""
  return prune_config.to_dict() if prune_config.sparsity else None


def mask_ema(ema: dict[str, Any], masks: Any) -> dict[str, Any]:
  """The EMA of the weights ({'params', 'batch_stats'}) masked as the weights are: evaluation uses it, so it
  must be exactly as sparse."""
  return {**ema, 'params': apply_masks(ema['params'], masks)}


@step_extensions.register
class Pruning(step_extensions.StepExtension):
  """The step extension: the run's optimizer `masked` (the masks are optimizer state, so checkpointed with
  it), and the EMA of the weights masked after each update."""

  name = 'prune'

  def __init__(self, config: ml_collections.ConfigDict, steps: Steps):
    self.config, self.schedule = config, Schedule.of(config.prune, steps)

  @classmethod
  def check_config(cls, config: ml_collections.ConfigDict) -> None:
    check_config(config)

  @classmethod
  def create(cls, config: ml_collections.ConfigDict, train_split: Any, steps: Steps) -> Pruning | None:
    return cls(config, steps) if config.prune.sparsity else None

  def wrap_optimizer(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
    select = functools.partial(pruned_paths, scope=self.config.prune.scope, freeze=self.config.optim.freeze)
    return masked(tx, self.schedule, select)

  def run_record(self) -> dict[str, Any]:
    return {'prune': run_record(self.config.prune)}

  def fingerprint(self) -> Any:
    return (super().fingerprint(), self.schedule)  # Its steps come from the run's length.

  def after_update(self, args, state):
    return state if state.ema is None else state.replace(ema=mask_ema(state.ema, state.opt_state.masks))


def first_ranked_step(config: ml_collections.ConfigDict, steps: Steps) -> int:
  """The first step whose evaluation may rank checkpoints: with pruning, where the target is reached."""
  return Schedule.of(config.prune, steps).end if config.prune.sparsity else 0


@jax.jit
def _zero_counts(tree: Any) -> Any:
  return jax.tree.map(lambda x: jnp.count_nonzero(x == 0), tree)


def sparsity_report(params: Any, config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Fractions of exact zeros, counted from `params` (never from masks): in the kernels `prune.scope`
  selects (`kernels`, and `per_kernel` by path) and over all parameters (`all_parameters`)."""
  zeros = {path: int(count) for path, count in flatten_dict(jax.device_get(_zero_counts(params))).items()}
  sizes = {path: leaf.size for path, leaf in flatten_dict(params).items()}
  paths = pruned_paths(params, config.prune.scope, config.optim.freeze)
  fraction = lambda among: sum(zeros[p] for p in among) / max(sum(sizes[p] for p in among), 1)
  return {
    'target': config.prune.sparsity,
    'scope': config.prune.scope,
    'kernels': fraction(paths),
    'all_parameters': fraction(list(sizes)),
    'per_kernel': {'/'.join(path): fraction([path]) for path in paths},
  }


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for `config.prune` values that contradict each other or the rest of the config
  (`compress.checks` has the rule of each field alone)."""
  prune = config.prune
  if prune.end_fraction <= prune.start_fraction:
    raise ConfigError(
      f'--config.prune.end_fraction={prune.end_fraction!r} is not after prune.start_fraction={prune.start_fraction!r}: '
      'pruning must end later in the run than it starts'
    )
  if prune.sparsity and config.optim.freeze == 'backbone' and models.HEAD not in SCOPES[prune.scope]:
    raise ConfigError(
      f'--config.prune.sparsity={prune.sparsity!r} prunes nothing with optim.freeze=backbone and '
      f'prune.scope={prune.scope!r} (only the classifier trains); set --config.prune.scope=hidden+classifier'
    )
