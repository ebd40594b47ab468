"""Training: one jitted, data-parallel step over a ('data',) mesh of all devices.

Parameters, batch statistics and optimizer state are replicated; batches are sharded along
the batch axis. BatchNorm has no `axis_name`: under jit its statistics are over the global
batch, so BN is synchronised across devices for free. Everything random is a pure function
of (seed, step, example index), so a resumed run is bit-identical to an uninterrupted one.
"""

import dataclasses
import functools
from collections.abc import Callable, Iterable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_flax import models, optim
from resnet_flax.compress import prune, quantize  # noqa: F401 (registers their step extensions)
from resnet_flax.data import augment, input_pipeline, mixing
from resnet_flax.errors import BudgetError
from resnet_flax.robust import adversarial  # noqa: F401 (registers its step extensions)
from resnet_flax.run.workdir import epoch_of
from resnet_flax.step_extensions import Batch, Loss, StepContext, StepExtension
from resnet_flax.train import consistency, distill  # noqa: F401 (registers their step extensions)


class TrainState(train_state.TrainState):
  batch_stats: Any
  nonfinite_steps: jax.Array  # Steps whose update was skipped because loss or gradients were not finite.
  first_nonfinite_step: jax.Array  # The first such step, -1 while there is none.
  ema: Any = None  # {'params', 'batch_stats'}: exponential moving average of the weights, if enabled.

  def eval_variables(self) -> dict[str, Any]:
    """The weights evaluation and reports use: the EMA when there is one."""
    return self.ema or {'params': self.params, 'batch_stats': self.batch_stats}


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  accuracy: metrics.Accuracy
  learning_rate: metrics.LastValue.from_output('learning_rate')


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  accuracy: metrics.Accuracy


def check_param_budget(params: Any, max_params: int) -> int:
  """Raises BudgetError over budget. Returns the count."""
  count = models.count_params(params)
  if count > max_params:
    raise BudgetError(
      f'the model has {count:,} trainable parameters, over the budget of {max_params:,}; '
      f'raise it with --config.model.max_params={count} or choose a smaller model.name'
    )
  return count


def create_train_state(model: flax.linen.Module, variables: Any, tx: optax.GradientTransformation, ema: bool = False):
  return TrainState.create(
    apply_fn=model.apply,
    params=variables['params'],
    batch_stats=variables['batch_stats'],
    tx=tx,
    nonfinite_steps=jnp.zeros((), jnp.int32),
    first_nonfinite_step=jnp.full((), -1, jnp.int32),
    ema=jax.tree.map(jnp.copy, dict(variables)) if ema else None,
  )


def cross_entropy(
  logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0, class_weights: np.ndarray | None = None
) -> jax.Array:
  """Per-example cross-entropy in float32 against [B, num_classes] targets, times each example's class
  weight when `class_weights` [num_classes] is given.

  An example weighs sum_c targets_c * class_weights_c: its class's weight for a one-hot target, and
  for a mixup/CutMix image the weights of both images in the proportions their pixels are mixed,
  rather than the weight of the first image alone, which may be the smaller part of it. Taken before
  label smoothing, which would pull every weight toward their mean.
  """
  loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), optax.smooth_labels(targets, label_smoothing))
  if class_weights is None:
    return loss
  return loss * jnp.sum(targets * jnp.asarray(class_weights, jnp.float32), axis=-1)


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """What the compiled train step is built for: fixed for a run, closed over, never traced."""

  config: ml_collections.ConfigDict
  learning_rate_fn: optax.Schedule
  mean: Any  # The training images' normalisation, per channel.
  std: Any
  num_classes: int
  steps_per_epoch: int
  class_weights: np.ndarray | None = None  # `optim.class_weight_vector`: the training loss's only.
  extensions: tuple[StepExtension, ...] = ()  # `step_extensions.create_all`, folded in this order.

  def arguments(self) -> dict[str, Any]:
    """The extensions' arguments of the step (`StepExtension.arguments`), by name."""
    return {extension.name: extension.arguments() for extension in self.extensions}


def train_step(
  state: TrainState, batch: dict[str, jax.Array], args: dict[str, Any], *, spec: StepSpec
) -> tuple[TrainState, TrainMetrics]:
  """One step on a uint8 batch, in one program: the plain step with the hooks of `spec.extensions` folded in,
  `args` their arguments (`StepSpec.arguments`). The plain loss is the batch mean of `cross_entropy`, divided
  by the batch size, not the sum of class weights: a batch rich in up-weighted classes moves the weights more."""
  config = spec.config
  step_key = jax.random.fold_in(jax.random.key(config.seed), state.step)
  augment_key, mix_key, dropout_key = jax.random.split(step_key, 3)
  inputs = Batch(*augmented_batch(batch, augment_key, mix_key, epoch_of(state.step, spec.steps_per_epoch), spec))
  train = config.optim.freeze != 'backbone'  # A frozen backbone (linear probe) keeps its BatchNorm statistics.
  forward = lambda variables, images: state.apply_fn(
    variables, images, train=train, mutable=['batch_stats'], rngs={'dropout': dropout_key}
  )
  context = StepContext(state, forward, step_key, spec.mean, spec.std)
  aux = {}
  for extension in spec.extensions:  # Outside the loss: SAM's ascent keeps the step's batch.
    inputs, aux[extension.name] = extension.prepare(args[extension.name], context, inputs)

  def loss_fn(params):
    logits, updates = forward({'params': params, 'batch_stats': state.batch_stats}, inputs.images)
    value = cross_entropy(logits, inputs.targets, config.optim.label_smoothing, spec.class_weights).mean()
    loss = Loss(value, logits, params, updates)
    for extension in spec.extensions:
      loss = extension.loss(args[extension.name], context, aux[extension.name], loss)
    return loss.value, (loss.logits, loss.updates['batch_stats'])

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, (logits, batch_stats)), grads = grad_fn(state.params)
  if optim.OPTIMIZERS[config.optim.name].sharpness_aware:
    grads = optim.sam_gradients(grad_fn, state.params, grads, config.optim.sam_rho, config.optim.sam_adaptive)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  if state.ema is not None:
    new_state = new_state.replace(ema=optim.update_ema(state.ema, new_state.params, batch_stats, config.ema_decay))
  for extension in spec.extensions:
    new_state = extension.after_update(args[extension.name], new_state)
  new_state = skip_if_nonfinite(state, new_state, loss, grads)
  return new_state, TrainMetrics.single_from_model_output(
    loss=loss, logits=logits, labels=batch['label'], learning_rate=spec.learning_rate_fn(state.step)
  )


def augmented_batch(
  batch: dict[str, jax.Array], augment_key: jax.Array, mix_key: jax.Array, epoch: jax.Array, spec: StepSpec
) -> tuple[jax.Array, jax.Array]:
  """The normalized, augmented images of a uint8 batch and their [B, num_classes] targets, mixed
  (mixup/CutMix) when the config asks for it."""
  config = spec.config
  images = augment.augment_batch(
    batch['image'],
    augment_key,
    config.augment,
    spec.mean,
    spec.std,
    indices=batch['index'],
    epoch=epoch,
    seed=config.seed,
  )
  targets = jax.nn.one_hot(batch['label'], spec.num_classes)
  if config.augment.mixup_alpha or config.augment.cutmix_alpha:
    images, targets = mixing.mix_batch(
      images,
      batch['label'],
      mix_key,
      num_classes=spec.num_classes,
      mixup_alpha=config.augment.mixup_alpha,
      cutmix_alpha=config.augment.cutmix_alpha,
      prob=config.augment.mix_prob,
    )
  return images, targets


def train_stack(
  state: TrainState, stack: dict[str, jax.Array], args: dict[str, Any], *, spec: StepSpec
) -> tuple[TrainState, TrainMetrics]:
  """`train_step` on each batch of a stack [steps, B, ...] in one program, their metrics merged as the
  loop merges single steps' metrics.

  Several steps run in a `lax.scan`: one call, so the host dispatches once for them all. One step
  runs without a loop: XLA:CPU runs convolutions inside loops tens of times slower (jax#12868).
  """
  if stack['label'].shape[0] == 1:
    return train_step(state, jax.tree.map(lambda x: x[0], stack), args, spec=spec)

  def step(carry, batch):
    state, merged = carry
    state, step_metrics = train_step(state, batch, args, spec=spec)
    return (state, merged.merge(step_metrics)), None

  (state, merged), _ = jax.lax.scan(step, (state, TrainMetrics.empty()), stack)
  return state, merged


def skip_if_nonfinite(old: TrainState, new: TrainState, loss: jax.Array, grads: Any) -> TrainState:
  """Keeps `old` (but advances the step) when the loss or a gradient is not finite, and counts it.

  The check is on the device, so no step waits for the host; the host reads the count at log and
  checkpoint steps and stops there unless `skip_nonfinite_updates`. No checkpoint ever holds NaNs.
  """
  finite = jnp.isfinite(loss) & jnp.all(jnp.stack([jnp.isfinite(g).all() for g in jax.tree.leaves(grads)]))
  kept = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  first = jnp.where(~finite & (old.first_nonfinite_step < 0), old.step + 1, old.first_nonfinite_step)
  return kept.replace(
    step=new.step, nonfinite_steps=old.nonfinite_steps + (~finite).astype(jnp.int32), first_nonfinite_step=first
  )


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, spec: StepSpec) -> EvalMetrics:
  logits = models.apply_to_pixels(state.apply_fn, state.eval_variables(), batch['image'], spec.mean, spec.std)
  loss = cross_entropy(logits, jax.nn.one_hot(batch['label'], spec.num_classes))
  return EvalMetrics.single_from_model_output(loss=loss, logits=logits, labels=batch['label'], mask=batch['mask'])


def compute_eval_metrics(eval_fn: Callable, state: TrainState, batches: Iterable) -> dict[str, float]:
  """Metrics over every example of the split exactly once (padding is masked out)."""
  total = None
  for batch in batches:
    batch_metrics = eval_fn(state, batch)
    total = batch_metrics if total is None else total.merge(batch_metrics)
  return {k: float(v) for k, v in jax.device_get(total.compute()).items()}


@dataclasses.dataclass(frozen=True)
class BoundTrainStep:
  """The jitted train step with the extensions' arguments bound: called with (state, stack); `lower` takes the
  same, for XLA's memory analysis before the first step (`train.memory`), whose executable the calls then run."""

  jitted: Any  # jax.jit of (state, stack, args).
  args: Any  # `StepSpec.arguments`, replicated.

  def __call__(self, state: TrainState, stack: dict[str, jax.Array]) -> tuple[TrainState, Any]:
    return self.jitted(state, stack, self.args)

  def lower(self, state: TrainState, stack: dict[str, Any]) -> jax.stages.Lowered:
    return self.jitted.lower(state, stack, self.args)


def jit_steps(spec: StepSpec, mesh: Mesh, stack_fn: Callable = train_stack) -> tuple[BoundTrainStep, Callable]:
  """The sharded train and eval steps. The state is replicated and donated to the train step, which takes a
  stack of batches (`stack_fn`: `train_stack`, or the learning-rate finder's, which returns each step's
  loss); the eval step takes one batch. The extensions' arguments (`StepSpec.arguments`: a teacher's
  weights, ε, α...) enter the train step as an argument, replicated and never donated, bound here."""
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  train_stack_fn = jax.jit(
    functools.partial(stack_fn, spec=spec),
    in_shardings=(replicated, input_pipeline.stacked_data_sharding(mesh), replicated),
    out_shardings=(replicated, replicated),
    donate_argnums=0,
  )
  train_fn = BoundTrainStep(train_stack_fn, jax.device_put(spec.arguments(), replicated))
  eval_fn = jax.jit(
    functools.partial(eval_step, spec=spec), in_shardings=(replicated, sharded), out_shardings=replicated
  )
  return train_fn, eval_fn
