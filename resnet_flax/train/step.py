"""Training: one jitted, data-parallel step over a ('data',) mesh of all devices.

Parameters, batch statistics and optimizer state are replicated; batches are sharded along
the batch axis. BatchNorm has no `axis_name`: under jit its statistics are over the global
batch, so BN is synchronised across devices for free. Everything random is a pure function
of (seed, step, example index), so a resumed run is bit-identical to an uninterrupted one.

Compiled once: the seed, the peak learning rate and the other values of `train.hyperparams` enter the step as
an argument, as the extensions' values do, and the program is kept per `StepSpec` (`_compiled`), which holds
only what changes the program. So the seeds of a recipe, a sweep's trials and a suite's rates run one
compiled step in a process, and with the persistent compilation cache (`--compilation_cache_dir`) across
processes. The state is data only: the model and the optimizer are the spec's, so runs' states have the same
tree, which jit's cache compares.
"""

import dataclasses
import functools
from collections.abc import Callable, Iterable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_flax import models, optim, step_extensions
from resnet_flax.compress import prune, quantize  # noqa: F401 (registers their step extensions)
from resnet_flax.data import augment, input_pipeline, mixing
from resnet_flax.errors import BudgetError
from resnet_flax.robust import adversarial  # noqa: F401 (registers its step extensions)
from resnet_flax.run.workdir import Steps, epoch_of
from resnet_flax.step_extensions import Batch, Loss, StepContext, StepExtension
from resnet_flax.train import consistency, distill, hyperparams  # noqa: F401 (registers their step extensions)
from resnet_flax.train.hyperparams import Hyperparams


class TrainState(flax.struct.PyTreeNode):
  """What training changes, and checkpoints: the fields of flax's TrainState less its model and optimizer
  (`StepSpec.model`, `StepSpec.optimizer`), which a compiled step must not take from one run's state."""

  step: jax.Array
  params: Any
  opt_state: optax.OptState
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


def create_train_state(variables: Any, tx: optax.GradientTransformation, ema: bool = False) -> TrainState:
  """Step 0 of `variables`, with `tx`'s initial state (`StepSpec.optimizer`: its tree does not depend on the
  hyperparameters' values)."""
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=variables['params'],
    opt_state=tx.init(variables['params']),
    batch_stats=variables['batch_stats'],
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


@dataclasses.dataclass(frozen=True, eq=False)
class StepSpec:
  """What the compiled train step is built for: closed over, never traced. Equal specs (`key`) share one
  compiled step, so a spec holds nothing a run may change without changing the program."""

  config: ml_collections.FrozenConfigDict  # `hyperparams.static_config`: no traced value in it.
  model: nn.Module  # As the extensions wrap it (QAT).
  schedule: Any  # `.at(peak)` -> the optax schedule: `optim.Schedule`, or the learning-rate finder's.
  mean: tuple[float, ...]  # The training images' normalisation, per channel.
  std: tuple[float, ...]
  num_classes: int
  steps_per_epoch: int
  class_weights: tuple[float, ...] | None = None  # `optim.class_weight_vector`: the training loss's only.
  extensions: tuple[StepExtension, ...] = ()  # `step_extensions.create_all`, folded in this order.

  def key(self) -> tuple[Any, ...]:
    fingerprints = tuple((extension.name, extension.fingerprint()) for extension in self.extensions)
    fields = (self.config, self.model, self.schedule, self.mean, self.std, self.num_classes, self.steps_per_epoch)
    return (*fields, self.class_weights, fingerprints)

  def __eq__(self, other: object) -> bool:
    return isinstance(other, StepSpec) and self.key() == other.key()

  def __hash__(self) -> int:
    return hash(self.key())

  def arguments(self) -> dict[str, Any]:
    """The extensions' arguments of the step (`StepExtension.arguments`), by name."""
    return {extension.name: extension.arguments() for extension in self.extensions}

  def learning_rate_fn(self, hparams: Hyperparams) -> optax.Schedule:
    return self.schedule.at(hparams['learning_rate'])

  def optimizer(self, hparams: Hyperparams) -> optax.GradientTransformation:
    """The run's optimizer for `hparams` (traced in the step), as the extensions wrap it (pruning's masks)."""
    tx = optim.create_optimizer(self.config.optim, self.learning_rate_fn(hparams), hparams)
    return step_extensions.fold(self.extensions, 'wrap_optimizer', tx)


def create_spec(
  config: ml_collections.ConfigDict,
  model: nn.Module,
  steps: Steps,
  mean: Any,
  std: Any,
  num_classes: int,
  class_weights: np.ndarray | None = None,
  extensions: tuple[StepExtension, ...] = (),
  schedule: Any = None,
) -> StepSpec:
  """The `StepSpec` of a run of `config` and `steps`: its static config, the rest made hashable; `schedule`
  (`.at(peak)`) replaces the config's (`optim.Schedule`)."""
  static = hyperparams.static_config(config)
  weights = None if class_weights is None else tuple(float(w) for w in class_weights)
  return StepSpec(
    static,
    model,
    schedule or optim.Schedule.of(static.optim, steps),
    tuple(float(m) for m in mean),
    tuple(float(s) for s in std),
    num_classes,
    steps.per_epoch,
    weights,
    tuple(extensions),
  )


def train_step(
  state: TrainState, batch: dict[str, jax.Array], hparams: Hyperparams, args: dict[str, Any], *, spec: StepSpec
) -> tuple[TrainState, TrainMetrics]:
  """One step on a uint8 batch, in one program: the plain step with the hooks of `spec.extensions` folded in.
  `hparams` are the run's traced hyperparameters (`train.hyperparams.of`), `args` the extensions' arguments
  (`StepSpec.arguments`). The plain loss is the batch mean of `cross_entropy`, divided by the batch size, not
  the sum of class weights: a batch rich in up-weighted classes moves the weights more."""
  config = spec.config
  step_key = jax.random.fold_in(jax.random.key(hparams['seed']), state.step)
  augment_key, mix_key, dropout_key = jax.random.split(step_key, 3)
  epoch = epoch_of(state.step, spec.steps_per_epoch)
  inputs = Batch(*augmented_batch(batch, augment_key, mix_key, epoch, hparams, spec))
  train = config.optim.freeze != 'backbone'  # A frozen backbone (linear probe) keeps its BatchNorm statistics.
  forward = lambda variables, images: spec.model.apply(
    variables, images, train=train, mutable=['batch_stats'], rngs={'dropout': dropout_key}
  )
  context = StepContext(state, forward, spec.model.apply, step_key, spec.mean, spec.std)
  aux = {}
  for extension in spec.extensions:  # Outside the loss: SAM's ascent keeps the step's batch.
    inputs, aux[extension.name] = extension.prepare(args[extension.name], context, inputs)

  def loss_fn(params):
    logits, updates = forward({'params': params, 'batch_stats': state.batch_stats}, inputs.images)
    value = cross_entropy(logits, inputs.targets, hparams['label_smoothing'], spec.class_weights).mean()
    loss = Loss(value, logits, params, updates)
    for extension in spec.extensions:
      loss = extension.loss(args[extension.name], context, aux[extension.name], loss)
    return loss.value, (loss.logits, loss.updates['batch_stats'])

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, (logits, batch_stats)), grads = grad_fn(state.params)
  if optim.OPTIMIZERS[config.optim.name].sharpness_aware:
    grads = optim.sam_gradients(grad_fn, state.params, grads, config.optim.sam_rho, config.optim.sam_adaptive)
  new_state = apply_gradients(state, grads, batch_stats, spec.optimizer(hparams))
  if state.ema is not None:
    new_state = new_state.replace(ema=optim.update_ema(state.ema, new_state.params, batch_stats, config.ema_decay))
  for extension in spec.extensions:
    new_state = extension.after_update(args[extension.name], new_state)
  new_state = skip_if_nonfinite(state, new_state, loss, grads)
  return new_state, TrainMetrics.single_from_model_output(
    loss=loss, logits=logits, labels=batch['label'], learning_rate=spec.learning_rate_fn(hparams)(state.step)
  )


def apply_gradients(state: TrainState, grads: Any, batch_stats: Any, tx: optax.GradientTransformation) -> TrainState:
  """The state one update of `tx` on: flax's `TrainState.apply_gradients`, with the optimizer as an argument."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, batch_stats=batch_stats)


def augmented_batch(
  batch: dict[str, jax.Array],
  augment_key: jax.Array,
  mix_key: jax.Array,
  epoch: jax.Array,
  hparams: Hyperparams,
  spec: StepSpec,
) -> tuple[jax.Array, jax.Array]:
  """The normalized, augmented images of a uint8 batch and their [B, num_classes] targets, mixed
  (mixup/CutMix) when an alpha is on (not None in `hparams`)."""
  config = spec.config
  images = augment.augment_batch(
    batch['image'],
    augment_key,
    config.augment,
    spec.mean,
    spec.std,
    indices=batch['index'],
    epoch=epoch,
    seed=hparams['seed'],
  )
  targets = jax.nn.one_hot(batch['label'], spec.num_classes)
  if hparams['mixup_alpha'] is not None or hparams['cutmix_alpha'] is not None:
    images, targets = mixing.mix_batch(
      images,
      batch['label'],
      mix_key,
      num_classes=spec.num_classes,
      mixup_alpha=hparams['mixup_alpha'],
      cutmix_alpha=hparams['cutmix_alpha'],
      prob=config.augment.mix_prob,
    )
  return images, targets


def train_stack(
  state: TrainState, stack: dict[str, jax.Array], hparams: Hyperparams, args: dict[str, Any], *, spec: StepSpec
) -> tuple[TrainState, TrainMetrics]:
  """`train_step` on each batch of a stack [steps, B, ...] in one program, their metrics merged as the
  loop merges single steps' metrics.

  Several steps run in a `lax.scan`: one call, so the host dispatches once for them all. One step
  runs without a loop: XLA:CPU runs convolutions inside loops tens of times slower (jax#12868).
  """
  if stack['label'].shape[0] == 1:
    return train_step(state, jax.tree.map(lambda x: x[0], stack), hparams, args, spec=spec)

  def step(carry, batch):
    state, merged = carry
    state, step_metrics = train_step(state, batch, hparams, args, spec=spec)
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
  logits = models.apply_to_pixels(spec.model.apply, state.eval_variables(), batch['image'], spec.mean, spec.std)
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
  """The jitted train step with the run's hyperparameters and the extensions' arguments bound: called with
  (state, stack); `lower` takes the same, for XLA's memory analysis before the first step (`train.memory`), whose
  executable the calls then run."""

  jitted: Any  # jax.jit of (state, stack, hparams, args).
  hparams: Hyperparams  # `train.hyperparams.of`, replicated.
  args: Any  # `StepSpec.arguments`, replicated.

  def __call__(self, state: TrainState, stack: dict[str, jax.Array]) -> tuple[TrainState, Any]:
    return self.jitted(state, stack, self.hparams, self.args)

  def lower(self, state: TrainState, stack: dict[str, Any]) -> jax.stages.Lowered:
    return self.jitted.lower(state, stack, self.hparams, self.args)


@functools.lru_cache(maxsize=8)
def _compiled(spec: StepSpec, mesh: Mesh, stack_fn: Callable) -> tuple[Callable, Callable]:
  """The jitted train and eval steps of `spec`: one pair per equal spec in a process, so jit's own cache
  serves every later run of it. The state is replicated and donated to the train step; the hyperparameters
  and the extensions' arguments are replicated and never donated."""
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  train_stack_fn = jax.jit(
    functools.partial(stack_fn, spec=spec),
    in_shardings=(replicated, input_pipeline.stacked_data_sharding(mesh), replicated, replicated),
    out_shardings=(replicated, replicated),
    donate_argnums=0,
  )
  eval_fn = jax.jit(
    functools.partial(eval_step, spec=spec), in_shardings=(replicated, sharded), out_shardings=replicated
  )
  return train_stack_fn, eval_fn


def jit_steps(
  spec: StepSpec, mesh: Mesh, hparams: Hyperparams, stack_fn: Callable = train_stack
) -> tuple[BoundTrainStep, Callable]:
  """The sharded train and eval steps, `hparams` and the extensions' arguments (`StepSpec.arguments`: a
  teacher's weights, ε, α...) bound to the train step. It takes a stack of batches (`stack_fn`: `train_stack`,
  or the learning-rate finder's, which returns each step's loss); the eval step takes one batch."""
  train_stack_fn, eval_fn = _compiled(spec, mesh, stack_fn)
  hparams, args = jax.device_put((hparams, spec.arguments()), NamedSharding(mesh, P()))
  return BoundTrainStep(train_stack_fn, hparams, args), eval_fn
