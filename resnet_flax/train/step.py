"""Training: one jitted, data-parallel step over a ('data',) mesh of all devices.

Parameters, batch statistics and optimizer state are replicated; batches are sharded along
the batch axis. BatchNorm has no `axis_name`: under jit its statistics are over the global
batch, so BN is synchronised across devices for free. Everything random is a pure function
of (seed, step, example index), so a resumed run is bit-identical to an uninterrupted one.
"""

import functools
import os
from collections.abc import Callable, Iterable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metrics, parameter_overview
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_flax import data, models, optim
from resnet_flax.compress import prune, quantize
from resnet_flax.data import augment, input_pipeline, mixing
from resnet_flax.errors import BudgetError, ConfigError
from resnet_flax.models import layers
from resnet_flax.robust import adversarial
from resnet_flax.run import checkpoint, curves, distributed, writers
from resnet_flax.run.workdir import RunInfo, Steps, check_resumable, check_writable
from resnet_flax.train import config_checks, distill, finetune, loop

ADVERSARIAL_STREAM = 2**32 - 2  # fold_in data of the attack's random start; split(step_key, 3)'s keys differ.
WHITENING_IMAGES = 5000  # Training images whose 2x2 patches set a whitening stem (airbench's number).


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


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  teacher_variables: Any = None,
  *,
  config: ml_collections.ConfigDict,
  learning_rate_fn: optax.Schedule,
  mean,
  std,
  num_classes: int,
  steps_per_epoch: int,
  class_weights: np.ndarray | None = None,
  teacher_logits_fn: distill.TeacherLogitsFn | None = None,
) -> tuple[TrainState, TrainMetrics]:
  """One step on a uint8 batch; augmentation, forward, backward and update in one program.

  The loss is the batch mean of the class-weighted cross-entropies (`cross_entropy`), a sum over the
  batch divided by its size, not by the sum of its weights: a batch rich in up-weighted classes
  moves the weights more, as it should. With a teacher (`teacher_logits_fn` of its `teacher_variables`)
  the loss is `distill.student_loss`.
  """
  step_key = jax.random.fold_in(jax.random.key(config.seed), state.step)
  augment_key, mix_key, dropout_key = jax.random.split(step_key, 3)
  images = augment.augment_batch(
    batch['image'],
    augment_key,
    config.augment,
    mean,
    std,
    indices=batch['index'],
    epoch=state.step // steps_per_epoch,
    seed=config.seed,
  )
  targets = jax.nn.one_hot(batch['label'], num_classes)
  if config.augment.mixup_alpha or config.augment.cutmix_alpha:
    images, targets = mixing.mix_batch(
      images,
      batch['label'],
      mix_key,
      num_classes=num_classes,
      mixup_alpha=config.augment.mixup_alpha,
      cutmix_alpha=config.augment.cutmix_alpha,
      prob=config.augment.mix_prob,
    )
  # Once per step, outside the differentiated loss: SAM neither recomputes nor differentiates the teacher.
  teacher_logits = None if teacher_logits_fn is None else teacher_logits_fn(teacher_variables, images)
  # A frozen backbone (linear probe) runs in inference mode: its BatchNorm statistics stay as they are.
  train = config.optim.freeze != 'backbone'
  forward = lambda variables, images: state.apply_fn(
    variables, images, train=train, mutable=['batch_stats'], rngs={'dropout': dropout_key}
  )
  method = config.adversarial.method
  if method != 'none':  # Also outside the loss: SAM's ascent keeps the step's adversarial images.
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    if method == 'trades':  # TRADES' code attacks in eval mode; Wong's and Madry's in train mode.
      attacked = lambda x: state.apply_fn(variables, x, train=False)
    else:
      attacked = lambda x: forward(variables, x)[0]
    attack_key = jax.random.fold_in(step_key, ADVERSARIAL_STREAM)
    adversarial_images = adversarial.perturb(attacked, images, targets, attack_key, config.adversarial, mean, std)
    images = images if method == 'trades' else adversarial_images

  def loss_fn(params):
    logits, updates = forward({'params': params, 'batch_stats': state.batch_stats}, images)
    loss = cross_entropy(logits, targets, config.optim.label_smoothing, class_weights).mean()
    if teacher_logits is not None:
      loss = distill.student_loss(loss, logits, teacher_logits, config.distill)
    if method == 'trades':  # The second forward pass moves the statistics on from the first, as in their code.
      adversarial_logits, updates = forward({'params': params, **updates}, adversarial_images)
      loss += config.adversarial.trades_beta * adversarial.kl_from_clean(logits, adversarial_logits).mean()
    return loss, (logits, updates['batch_stats'])

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, (logits, batch_stats)), grads = grad_fn(state.params)
  if optim.OPTIMIZERS[config.optim.name].sharpness_aware:
    grads = optim.sam_gradients(grad_fn, state.params, grads, config.optim.sam_rho, config.optim.sam_adaptive)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  if state.ema is not None:
    ema = optim.update_ema(state.ema, new_state.params, batch_stats, config.ema_decay)
    new_state = new_state.replace(ema=prune.mask_ema(ema, new_state.opt_state))
  new_state = skip_if_nonfinite(state, new_state, loss, grads)
  step_metrics = TrainMetrics.single_from_model_output(
    loss=loss, logits=logits, labels=batch['label'], learning_rate=learning_rate_fn(state.step)
  )
  return new_state, step_metrics


def train_stack(
  state: TrainState, stack: dict[str, jax.Array], teacher_variables: Any = None, **step_kwargs
) -> tuple[TrainState, TrainMetrics]:
  """`train_step` on each batch of a stack [steps, B, ...] in one program, their metrics merged as the
  loop merges single steps' metrics.

  Several steps run in a `lax.scan`: one call, so the host dispatches once for them all. One step
  runs without a loop: XLA:CPU runs convolutions inside loops tens of times slower (jax#12868).
  """
  if stack['label'].shape[0] == 1:
    return train_step(state, jax.tree.map(lambda x: x[0], stack), teacher_variables, **step_kwargs)

  def step(carry, batch):
    state, merged = carry
    state, step_metrics = train_step(state, batch, teacher_variables, **step_kwargs)
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


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, mean, std, num_classes: int) -> EvalMetrics:
  images = augment.normalize(batch['image'], mean, std)
  logits = state.apply_fn(state.eval_variables(), images, train=False)
  loss = cross_entropy(logits, jax.nn.one_hot(batch['label'], num_classes))
  return EvalMetrics.single_from_model_output(loss=loss, logits=logits, labels=batch['label'], mask=batch['mask'])


def compute_eval_metrics(eval_fn: Callable, state: TrainState, batches: Iterable) -> dict[str, float]:
  """Metrics over every example of the split exactly once (padding is masked out)."""
  total = None
  for batch in batches:
    batch_metrics = eval_fn(state, batch)
    total = batch_metrics if total is None else total.merge(batch_metrics)
  return {k: float(v) for k, v in jax.device_get(total.compute()).items()}


def jit_steps(
  config: ml_collections.ConfigDict,
  mesh: Mesh,
  learning_rate_fn: optax.Schedule,
  mean,
  std,
  num_classes: int,
  steps_per_epoch: int,
  class_weights: np.ndarray | None = None,
  teacher: distill.Teacher | None = None,
  stack_fn: Callable = train_stack,
) -> tuple[Callable, Callable]:
  """The sharded train and eval steps. The state is replicated and donated to the train step, which
  takes a stack of batches (`stack_fn`: `train_stack`, or the learning-rate finder's, which returns each
  step's loss); the eval step takes one batch. `class_weights` (of
  `optim.class_weight_vector`) weigh the training loss only: the evaluation loss stays unweighted.
  A `teacher` (of `distill.load_teacher`) is distilled from: its weights enter the train step as an
  argument (replicated, never donated; not constants compiled into the program), bound here."""
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  step_kwargs = dict(config=config, learning_rate_fn=learning_rate_fn, mean=mean, std=std, num_classes=num_classes)
  teacher_logits_fn = None if teacher is None else teacher.logits_fn(mean, std)
  teacher_variables = None if teacher is None else teacher.variables
  train_stack_fn = jax.jit(
    functools.partial(
      stack_fn,
      **step_kwargs,
      steps_per_epoch=steps_per_epoch,
      class_weights=class_weights,
      teacher_logits_fn=teacher_logits_fn,
    ),
    in_shardings=(replicated, input_pipeline.stacked_data_sharding(mesh), replicated),
    out_shardings=(replicated, replicated),
    donate_argnums=0,
  )
  train_fn = lambda state, stack: train_stack_fn(state, stack, teacher_variables)
  eval_fn = jax.jit(
    functools.partial(eval_step, mean=mean, std=std, num_classes=num_classes),
    in_shardings=(replicated, sharded),
    out_shardings=replicated,
  )
  return train_fn, eval_fn


def initial_variables(
  config: ml_collections.ConfigDict, model: flax.linen.Module, train_split: data.ImageData, mean, std
):
  """Initialised weights of `model`, a whitening stem set from the training images, within the budget."""
  variables = models.init_variables(model, train_split.images.shape[1:], jax.random.key(config.seed))
  if layers.WHITENING in variables['params']:
    whitening_images = augment.normalize(train_split.images[:WHITENING_IMAGES], mean, std)
    variables = layers.set_patch_whitening(variables, whitening_images)
  parameter_overview.log_parameter_overview(variables['params'])
  num_params = check_param_budget(variables['params'], config.model.max_params)
  logging.info(
    '%s: %s trainable parameters (budget %s)', config.model.name, f'{num_params:,}', f'{config.model.max_params:,}'
  )
  return variables


def guarded(
  evaluate_fn: Callable, config: ml_collections.ConfigDict, model, splits, pipeline, mean, std
) -> tuple[Callable, adversarial.Guard]:
  """`evaluate_fn` that also measures the overfitting guard's PGD accuracy, and the guard."""
  split, what = adversarial.guard_split(splits, config.eval_batch_size)
  apply = lambda variables, pixels: model.apply(variables, augment.normalize(pixels * 255, mean, std), train=False)
  guard_metric = adversarial.guard_metric_fn(apply, config.adversarial.epsilon, config.seed)
  logging.info('Overfitting guard: %s on %s at every evaluation', adversarial.GUARD_ATTACK, what)
  # `split` lives as long as the closure: the pipeline keeps its batches on the devices by its id.
  batch = lambda: pipeline.eval_batches(split, config.eval_batch_size)[0]
  guarded_fn = lambda state: {**evaluate_fn(state), **guard_metric(state.eval_variables(), batch())}
  return guarded_fn, adversarial.Guard(config.adversarial.guard_drop, what)


def warn_if_bfloat16_on_cpu(config: ml_collections.ConfigDict, backend: str) -> None:
  """bfloat16 on a CPU without bf16 units runs as float32 with conversions: measured here, ~7% faster for
  a resnet_tiny step and less accurate; float32 is the CPU setting."""
  if backend == 'cpu' and models.compute_dtype(config) == jnp.bfloat16:
    logging.warning(
      'bfloat16 on a CPU (half_precision or model.dtype): converted to float32 at every op, a few percent '
      'faster at a cost in accuracy; --config.half_precision=False --config.model.dtype=float32 is the CPU setting'
    )


def describe_validation(data_config: ml_collections.ConfigDict, splits: dict[str, data.ImageData]) -> str:
  """What the validation split is, for logs and run.json; '' when there is none."""
  if 'validation' not in splits:
    return ''
  size = len(splits['validation'])
  if data_config.validation_size:
    return f'the validation split of {size} held-out training images (data.validation_size)'
  return f'the validation split of {size} images of the {data_config.source} data'


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  on_evaluation: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
  """Trains (resuming from `workdir` if it holds checkpoints) and returns the final eval metrics.

  `on_evaluation(step, metrics)` follows every evaluation (loop.TrainLoop.on_evaluation).
  """
  config_checks.validate(config)
  warn_if_bfloat16_on_cpu(config, jax.default_backend())
  check_writable(workdir)
  logging.info('Config:\n%s', config)
  splits = data.load_splits(config.data)
  train_split, eval_split = splits['train'], splits.get('validation', splits['test'])
  validation = describe_validation(config.data, splits)
  if config.early_stopping_patience and not validation:
    raise ConfigError(
      f'early_stopping_patience={config.early_stopping_patience} needs a validation split, never the test split: '
      'set --config.data.validation_size=<images>, or add a val/ folder beside train/'
    )
  logging.info('Evaluating on %s', validation or 'the test split (reported only: nothing is chosen by it)')
  steps = Steps.of(config, len(train_split))
  num_classes = len(train_split.class_names)
  class_weights = optim.class_weight_vector(config.optim.class_weights, train_split.labels, train_split.class_names)
  model = quantize.training_model(models.create_model_from_config(config, num_classes), config.quantize)
  mean, std = augment.channel_stats(train_split.images)
  variables = initial_variables(config, model, train_split, mean, std)
  variables, mean, std, init_from = finetune.apply_init_from(
    config, workdir, variables, train_split.class_names, mean, std
  )
  teacher = distill.load_teacher(config, train_split)

  learning_rate_fn = optim.create_learning_rate_fn(config.optim, steps)
  mesh = distributed.create_mesh()
  tx = prune.wrap_optimizer(optim.create_optimizer(config.optim, learning_rate_fn), config, steps)
  state = create_train_state(model, variables, tx, ema=config.ema_decay > 0)
  state = jax.device_put(state, NamedSharding(mesh, P()))

  run = RunInfo(
    model_name=config.model.name,
    se_ratio=config.model.se_ratio,
    stem=config.model.stem,
    image_shape=train_split.images.shape[1:],
    class_names=train_split.class_names,
    pixel_mean=mean,
    pixel_std=std,
    steps_per_epoch=steps.per_epoch,
    init_from=init_from,
    resize=config.data.resize,
    validation=validation,
    teacher=None if teacher is None else teacher.identity,
    quantize=quantize.run_record(config.quantize),
    prune=prune.run_record(config.prune),
  )
  check_resumable(workdir, run)
  os.makedirs(workdir, exist_ok=True)
  manager = checkpoint.create_manager(workdir, config.keep_checkpoints, config.checkpoint_every_steps)
  writer = writers.create_writer(workdir, is_primary=jax.process_index() == 0, steps_per_epoch=steps.per_epoch)
  try:
    restored = checkpoint.restore_latest_good(manager, state)
    state = state if restored is None else restored
    start_step = int(jax.device_get(state.step))
    if restored is not None:
      logging.info('Resuming from the checkpoint of step %d in %s', start_step, workdir)
    if start_step >= steps.total:
      logging.info('Training is already complete: step %d of %d. Nothing to do.', start_step, steps.total)
      return {}
    run.save(workdir, config)
    if jax.process_index() == 0:
      writers.drop_csv_rows_after(workdir, start_step)  # Rows a killed run wrote after its last checkpoint.
    if start_step == 0:
      num_params = models.count_params(variables['params'])
      writer.write_hparams({**writers.flatten_hparams(config), 'num_params': num_params})

    train_fn, eval_fn = jit_steps(
      config, mesh, learning_rate_fn, mean, std, num_classes, steps.per_epoch, class_weights, teacher
    )
    pipeline = input_pipeline.create_pipeline(
      config.data.pipeline, train_split, config.batch_size, config.seed, mesh, sampling=config.data.sampling
    )
    evaluate_fn = lambda s: compute_eval_metrics(eval_fn, s, pipeline.eval_batches(eval_split, config.eval_batch_size))
    guard = None
    if config.adversarial.method != 'none' and config.adversarial.guard_drop:
      evaluate_fn, guard = guarded(evaluate_fn, config, model, splits, pipeline, mean, std)
    train_loop = loop.TrainLoop(
      config,
      steps,
      pipeline,
      train_fn,
      evaluate_fn,
      manager,
      writer,
      validates=bool(validation),
      ranks_from=prune.first_ranked_step(config, steps),
      guard=guard,
      on_evaluation=on_evaluation,
    )
    eval_metrics = train_loop.run(state, start_step)
  finally:
    try:
      checkpoint.wait_until_finished(manager)
    finally:
      manager.close()
      writer.flush()
  if jax.process_index() == 0:
    curves.write_training_curves(workdir, steps.per_epoch)
  return eval_metrics
