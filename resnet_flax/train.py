"""Training and evaluation: one jitted, data-parallel step over a ('data',) mesh of all devices.

Parameters, batch statistics and optimizer state are replicated; batches are sharded along
the batch axis. BatchNorm has no `axis_name`: under jit its statistics are over the global
batch, so BN is synchronised across devices for free. Everything random is a pure function
of (seed, step, example index), so a resumed run is bit-identical to an uninterrupted one.
"""

import dataclasses
import functools
import json
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from clu import metrics, parameter_overview
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_flax import (
  augment,
  checkpoint,
  config_checks,
  data,
  input_pipeline,
  mixing,
  models,
  plots,
  preemption,
  writers,
)
from resnet_flax.errors import BudgetError, ConfigError, NonFiniteError

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


def compute_dtype(config: ml_collections.ConfigDict):
  return jnp.bfloat16 if config.half_precision or config.model.dtype == 'bfloat16' else jnp.float32


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> models.ResNet:
  return models.create_model(
    config.model.name,
    num_classes,
    dtype=compute_dtype(config),
    dropout_rate=config.model.dropout_rate,
    se_ratio=config.model.se_ratio,
    zero_init_residual=config.model.zero_init_residual,
    drop_path_rate=config.model.drop_path_rate,
    dirac_init=config.model.dirac_init,
    stem=config.model.stem,
  )


def set_patch_whitening(variables, images, mean, std, num_images: int = WHITENING_IMAGES):
  """Sets a `PatchWhitening` stem's kernel from the first `num_images` training images, normalized
  as the train step normalizes them; other models are returned as they are."""
  if models.WHITENING not in variables['params']:
    return variables
  kernel = models.whitening_kernel(augment.normalize(images[:num_images], mean, std))
  params = {**variables['params'], models.WHITENING: {'kernel': kernel}}
  return {**variables, 'params': params}


def check_param_budget(params, max_params: int) -> int:
  """Logs the parameter overview; raises BudgetError over budget. Returns the count."""
  count = models.count_params(params)
  if count > max_params:
    raise BudgetError(
      f'the model has {count:,} trainable parameters, over the budget of {max_params:,}; '
      f'raise it with --config.model.max_params={count} or choose a smaller model.name'
    )
  return count


def create_learning_rate_fn(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then `optim.schedule`: cosine or linear decay to 0, or steps."""
  optim = config.optim
  total_steps = max(1, round(config.num_epochs * steps_per_epoch))
  warmup_steps = min(round(optim.warmup_epochs * steps_per_epoch), total_steps - 1)
  peak = optim.learning_rate
  if optim.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, decay_steps=total_steps, end_value=0.0)
  if optim.schedule == 'onecycle':
    decay = optax.linear_schedule(peak, 0.0, total_steps - warmup_steps)
  else:  # 'step': multiply by `step_gamma` at each of `step_epochs`.
    boundaries = {round(e * steps_per_epoch) - warmup_steps: optim.step_gamma for e in optim.step_epochs}
    decay = optax.piecewise_constant_schedule(peak, boundaries)
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps), decay], [warmup_steps])


def kernel_mask(params):
  """True for conv and dense kernels: weight decay skips BatchNorm parameters and biases."""
  return flax.traverse_util.path_aware_map(lambda path, _: path[-1] == 'kernel', params)


def create_optimizer(config: ml_collections.ConfigDict, learning_rate_fn: optax.Schedule):
  """The optimizer of `optim.name`; BatchNorm scales may be frozen and BN biases get their own rate.

  Frozen BN scales with faster BN biases are one of airbench's speed tricks. A whitening stem is
  always frozen: neither the gradient nor weight decay moves it.
  """
  optim = config.optim
  bias_lr = lambda step: optim.bn_bias_lr_multiplier * learning_rate_fn(step)
  return optax.multi_transform(
    {
      'other': _base_optimizer(optim, learning_rate_fn),
      'bn_scale': optax.set_to_zero() if optim.bn_scale_frozen else _base_optimizer(optim, learning_rate_fn),
      'bn_bias': _base_optimizer(optim, bias_lr),
      'frozen': optax.set_to_zero(),
    },
    param_labels,
  )


def param_labels(params):
  """'frozen' for a whitening stem, 'bn_scale' / 'bn_bias' for BatchNorm parameters, 'other' for the rest."""

  def label(path, _):
    if path[0] == models.WHITENING:
      return 'frozen'
    is_norm = any('norm' in part.lower() for part in path[:-1])
    return f'bn_{path[-1]}' if is_norm and path[-1] in ('scale', 'bias') else 'other'

  return flax.traverse_util.path_aware_map(label, params)


def _base_optimizer(optim: ml_collections.ConfigDict, learning_rate_fn: optax.Schedule):
  """SGD (with SAM, the same base), Adam or AdamW; weight decay on kernels only.

  `weight_decay` is an L2 term added to the gradient (coupled), except for AdamW and with
  `decoupled_weight_decay`, where it shrinks the weights outside the momentum (Loshchilov & Hutter).
  """
  decay = optax.add_decayed_weights(optim.weight_decay, mask=kernel_mask)
  if optim.name == 'adamw':
    return optax.adamw(learning_rate_fn, optim.b1, optim.b2, weight_decay=optim.weight_decay, mask=kernel_mask)
  if optim.name == 'adam':
    return optax.chain(decay, optax.adam(learning_rate_fn, optim.b1, optim.b2))
  if optim.decoupled_weight_decay:
    return optax.chain(
      optax.trace(decay=optim.momentum, nesterov=optim.nesterov), decay, optax.scale_by_learning_rate(learning_rate_fn)
    )
  return optax.chain(decay, optax.sgd(learning_rate_fn, momentum=optim.momentum, nesterov=optim.nesterov))


def create_train_state(model: models.ResNet, variables, tx, ema: bool = False) -> TrainState:
  return TrainState.create(
    apply_fn=model.apply,
    params=variables['params'],
    batch_stats=variables['batch_stats'],
    tx=tx,
    nonfinite_steps=jnp.zeros((), jnp.int32),
    first_nonfinite_step=jnp.full((), -1, jnp.int32),
    ema=jax.tree.map(jnp.copy, dict(variables)) if ema else None,
  )


def update_ema(ema, params, batch_stats, decay: float):
  """ema <- decay * ema + (1 - decay) * current, for the weights and the BN statistics."""
  current = {'params': params, 'batch_stats': batch_stats}
  return optax.incremental_update(current, ema, step_size=1.0 - decay)


def sam_gradients(grad_fn: Callable, params, grads, rho: float, adaptive: bool):
  """Sharpness-aware minimisation (Foret et al. 2021): the gradient at the worst point within rho.

  Ascends to w + e with e = rho g / |g| (adaptive, Kwon et al. 2021: e = rho w^2 g / |w g|), and
  returns the gradient there. Written here rather than with `optax.contrib.sam`, whose opaque mode
  needs the loss closure threaded through the optimizer: two lines in the step are simpler.
  """
  scale = jax.tree.map(jnp.abs, params) if adaptive else jax.tree.map(jnp.ones_like, params)
  norm = optax.global_norm(jax.tree.map(jnp.multiply, scale, grads))
  ascent = jax.tree.map(lambda g, s: rho * s * s * g / (norm + 1e-12), grads, scale)
  return grad_fn(jax.tree.map(jnp.add, params, ascent))[1]


def cross_entropy(logits, targets, label_smoothing: float = 0.0):
  """Per-example cross-entropy in float32 against [B, num_classes] targets."""
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), optax.smooth_labels(targets, label_smoothing))


def train_step(
  state: TrainState,
  batch,
  *,
  config: ml_collections.ConfigDict,
  learning_rate_fn,
  mean,
  std,
  num_classes: int,
  steps_per_epoch: int,
):
  """One step on a uint8 batch; augmentation, forward, backward and update in one program."""
  step_key = jax.random.fold_in(jax.random.key(config.seed), state.step)
  augment_key, mix_key, dropout_key = jax.random.split(step_key, 3)
  images = batch['image']
  if config.augment.alternating_flip:
    images = augment.alternating_flip(images, batch['index'], state.step // steps_per_epoch, config.seed)
  images = augment.augment_batch(images, augment_key, config.augment, mean, std)
  targets = jax.nn.one_hot(batch['label'], num_classes)
  if config.augment.mixup_alpha or config.augment.cutmix_alpha:
    images, targets = mixing.mix_batch(
      images,
      batch['label'],
      mix_key,
      num_classes=num_classes,
      mixup_alpha=config.augment.mixup_alpha,
      cutmix_alpha=config.augment.cutmix_alpha,
    )

  def loss_fn(params):
    variables = {'params': params, 'batch_stats': state.batch_stats}
    logits, updates = state.apply_fn(
      variables, images, train=True, mutable=['batch_stats'], rngs={'dropout': dropout_key}
    )
    loss = cross_entropy(logits, targets, config.optim.label_smoothing).mean()
    return loss, (logits, updates['batch_stats'])

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, (logits, batch_stats)), grads = grad_fn(state.params)
  if config.optim.name == 'sam':
    grads = sam_gradients(grad_fn, state.params, grads, config.optim.sam_rho, config.optim.sam_adaptive)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  if state.ema is not None:
    new_state = new_state.replace(ema=update_ema(state.ema, new_state.params, batch_stats, config.ema_decay))
  new_state = skip_if_nonfinite(state, new_state, loss, grads)
  step_metrics = TrainMetrics.single_from_model_output(
    loss=loss, logits=logits, labels=batch['label'], learning_rate=learning_rate_fn(state.step)
  )
  return new_state, step_metrics


def train_steps(state: TrainState, batches, **step_kwargs):
  """`train_step` on each of the stacked `batches` [steps, B, ...] in one program, with their metrics
  merged as the loop merges single steps' metrics.

  Several steps run in a `lax.scan`: one call, so the host dispatches once for them all. One step
  runs without a loop: XLA:CPU runs convolutions inside loops tens of times slower (jax#12868).
  """
  if batches['label'].shape[0] == 1:
    return train_step(state, jax.tree.map(lambda x: x[0], batches), **step_kwargs)

  def step(carry, batch):
    state, merged = carry
    state, step_metrics = train_step(state, batch, **step_kwargs)
    return (state, merged.merge(step_metrics)), None

  (state, merged), _ = jax.lax.scan(step, (state, TrainMetrics.empty()), batches)
  return state, merged


def skip_if_nonfinite(old: TrainState, new: TrainState, loss, grads) -> TrainState:
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


def eval_step(state: TrainState, batch, *, mean, std, num_classes: int):
  images = augment.normalize(batch['image'], mean, std)
  logits = state.apply_fn(state.eval_variables(), images, train=False)
  loss = cross_entropy(logits, jax.nn.one_hot(batch['label'], num_classes))
  return EvalMetrics.single_from_model_output(loss=loss, logits=logits, labels=batch['label'], mask=batch['mask'])


def evaluate(eval_fn: Callable, state: TrainState, batches) -> dict[str, float]:
  """Metrics over every example of the split exactly once (padding is masked out)."""
  total = None
  for batch in batches:
    batch_metrics = eval_fn(state, batch)
    total = batch_metrics if total is None else total.merge(batch_metrics)
  return {k: float(v) for k, v in total.compute().items()}


def create_mesh() -> Mesh:
  """A 1-D ('data',) mesh of every device of every process."""
  return jax.make_mesh((jax.device_count(),), ('data',), axis_types=(jax.sharding.AxisType.Auto,))


def jit_steps(config, mesh: Mesh, learning_rate_fn, mean, std, num_classes: int, steps_per_epoch: int):
  """The sharded train and eval steps. The state is replicated and donated to the train step, which
  takes stacked batches (`train_steps`); the eval step takes one batch."""
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  train_fn = jax.jit(
    functools.partial(
      train_steps,
      config=config,
      learning_rate_fn=learning_rate_fn,
      mean=mean,
      std=std,
      num_classes=num_classes,
      steps_per_epoch=steps_per_epoch,
    ),
    in_shardings=(replicated, input_pipeline.stacked_data_sharding(mesh)),
    out_shardings=(replicated, replicated),
    donate_argnums=0,
  )
  eval_fn = jax.jit(
    functools.partial(eval_step, mean=mean, std=std, num_classes=num_classes),
    in_shardings=(replicated, sharded),
    out_shardings=replicated,
  )
  return train_fn, eval_fn


class Progress:
  """Progress lines with throughput and ETA, from host-side step counts only (no device sync)."""

  def __init__(self, start_step: int, total_steps: int, batch_size: int):
    self.total_steps, self.batch_size = total_steps, batch_size
    self.last_step, self.last_time = start_step, time.perf_counter()

  def rates(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    steps_per_sec = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    return {'steps_per_sec': steps_per_sec, 'images_per_sec': steps_per_sec * self.batch_size}

  def log(self, step: int, scalars: dict[str, float]):
    eta = (self.total_steps - step) / max(scalars['steps_per_sec'], 1e-9)
    logging.info(
      'step %d/%d (%.0f%%) loss %.4f accuracy %.4f lr %.4g | %.1f steps/s, %.0f images/s | ETA %s',
      step,
      self.total_steps,
      100 * step / self.total_steps,
      scalars['loss'],
      scalars['accuracy'],
      scalars['learning_rate'],
      scalars['steps_per_sec'],
      scalars['images_per_sec'],
      time.strftime('%H:%M:%S', time.gmtime(eta)),
    )


def run_fingerprint(config: ml_collections.ConfigDict, train: data.ImageData) -> dict[str, Any]:
  """What a checkpoint must agree with to be resumed: the model and the data's shape."""
  return {
    'model.name': config.model.name,
    'model.se_ratio': config.model.se_ratio,
    'model.stem': config.model.stem,
    'image_shape': list(train.images.shape[1:]),
    'num_classes': len(train.class_names),
    'class_names': list(train.class_names),
  }


def check_resumable(workdir: str, fingerprint: dict[str, Any]):
  """Refuses to resume a workdir whose checkpoints were made for another model or data shape."""
  path = os.path.join(workdir, 'run.json')
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  changed = [f'{k}: {saved.get(k)} -> {v}' for k, v in fingerprint.items() if saved.get(k) != v]
  if changed:
    raise ConfigError(
      f'workdir {workdir} holds checkpoints of another model or data shape '
      f'({"; ".join(changed)}); use a new --workdir or restore those values'
    )


def save_run_files(workdir: str, config: ml_collections.ConfigDict, fingerprint: dict[str, Any]):
  if jax.process_index() != 0:
    return
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  with open(os.path.join(workdir, 'run.json'), 'w') as f:
    json.dump(fingerprint, f, indent=2)


def check_writable(workdir: str):
  """Fails early, leaving no trace, if `workdir` (or the folder it would be created in) is not writable."""
  existing = os.path.abspath(workdir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  try:
    if not os.path.isdir(existing):
      raise NotADirectoryError(f'{existing} is a file')
    with tempfile.TemporaryFile(dir=existing):
      pass
  except OSError as e:
    raise ConfigError(f'workdir {workdir} is not writable ({e}); choose another --workdir') from e


@dataclasses.dataclass
class TrainLoop:
  """What the steps of a run need besides the state; `run` is the loop itself."""

  config: ml_collections.ConfigDict
  pipeline: input_pipeline.InputPipeline
  train_fn: Callable
  evaluate_fn: Callable[[TrainState], dict[str, float]]
  manager: Any
  writer: Any
  total_steps: int
  eval_every_steps: int

  def run(self, state: TrainState, start_step: int) -> dict[str, float]:
    config = self.config
    progress = Progress(start_step, self.total_steps, config.batch_size)
    unlogged_metrics, eval_metrics = [], {}
    steps_per_epoch = self.pipeline.steps_per_epoch
    lengths = input_pipeline.call_lengths(
      start_step,
      self.total_steps,
      config.steps_per_call,
      (config.log_every_steps, self.eval_every_steps, config.checkpoint_every_steps, steps_per_epoch),
    )
    logging.info(
      'Training steps %d..%d (%d per epoch) in %d calls of at most %d steps',
      start_step + 1,
      self.total_steps,
      steps_per_epoch,
      len(lengths),
      config.steps_per_call,
    )
    with preemption.StopRequest() as stop:
      batches = self.pipeline.train_batches(start_step, lengths)
      step = start_step
      for length, batch in zip(lengths, batches, strict=True):
        state, call_metrics = self.train_fn(state, batch)
        step += length
        unlogged_metrics.append(call_metrics)
        is_last = step == self.total_steps
        is_log_step = step % config.log_every_steps == 0 or is_last
        if is_log_step:
          self._log_train_metrics(state, step, unlogged_metrics, progress)
          unlogged_metrics = []
        is_eval_step = step % self.eval_every_steps == 0 or is_last
        if is_eval_step:
          eval_metrics = self.evaluate_fn(state)
          self.writer.write_scalars(step, {f'eval_{k}': v for k, v in eval_metrics.items()})
        # With several processes, agreeing on a stop costs an all-gather: do it at log steps only.
        stopping = (is_log_step or jax.process_count() == 1) and stop.requested()
        force_save = is_last or is_eval_step or stopping
        if force_save or self.manager.should_save(step):
          self._check_finite(state)
          checkpoint.save(self.manager, step, state, metrics=eval_metrics if is_eval_step else None, force=force_save)
        if stopping:
          logging.warning(
            'Stopped by %s at step %d with a checkpoint; rerun the same command to resume.', stop.signal_name, step
          )
          break
    return eval_metrics

  def _log_train_metrics(self, state: TrainState, step: int, call_metrics, progress: Progress):
    self._check_finite(state)
    scalars = {f'train_{k}': v for k, v in _merge(call_metrics).compute().items()}
    if self.config.skip_nonfinite_updates:
      scalars['train_nonfinite_steps'] = int(state.nonfinite_steps)
    scalars.update(progress.rates(step))
    self.writer.write_scalars(step, scalars)
    progress.log(step, {k.removeprefix('train_'): float(v) for k, v in scalars.items()})

  def _check_finite(self, state: TrainState):
    if self.config.skip_nonfinite_updates or not int(state.nonfinite_steps):
      return
    latest = self.manager.latest_step()
    kept = f'the checkpoint of step {latest} is intact' if latest is not None else 'no checkpoint was saved'
    raise NonFiniteError(
      f'the loss became non-finite at step {int(state.first_nonfinite_step)} ({kept}); lower '
      '--config.optim.learning_rate, or pass --config.skip_nonfinite_updates=True to skip such steps'
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (resuming from `workdir` if it holds checkpoints) and returns the final eval metrics."""
  config_checks.validate(config)
  check_writable(workdir)
  logging.info('Config:\n%s', config)
  splits = data.load_splits(config.data)
  train_split, test_split = splits['train'], splits['test']
  num_classes = len(train_split.class_names)
  steps_per_epoch = len(train_split) // config.batch_size
  if steps_per_epoch == 0:
    raise ConfigError(
      f'batch_size={config.batch_size} is larger than the {len(train_split)} training images; lower --config.batch_size'
    )
  total_steps = max(1, round(config.num_epochs * steps_per_epoch))
  eval_every_steps = max(1, round(config.eval_every_epochs * steps_per_epoch))

  model = create_model(config, num_classes)
  mean, std = augment.channel_stats(train_split.images)
  variables = models.init_variables(model, train_split.images.shape[1:], jax.random.key(config.seed))
  variables = set_patch_whitening(variables, train_split.images, mean, std)
  parameter_overview.log_parameter_overview(variables['params'])
  num_params = check_param_budget(variables['params'], config.model.max_params)
  logging.info(
    '%s: %s trainable parameters (budget %s)', config.model.name, f'{num_params:,}', f'{config.model.max_params:,}'
  )

  learning_rate_fn = create_learning_rate_fn(config, steps_per_epoch)
  mesh = create_mesh()
  tx = create_optimizer(config, learning_rate_fn)
  state = jax.device_put(create_train_state(model, variables, tx, ema=config.ema_decay > 0), NamedSharding(mesh, P()))

  fingerprint = run_fingerprint(config, train_split)
  check_resumable(workdir, fingerprint)
  os.makedirs(workdir, exist_ok=True)
  manager = checkpoint.create_manager(workdir, config.keep_checkpoints, config.checkpoint_every_steps)
  writer = writers.create_writer(workdir, is_primary=jax.process_index() == 0)
  try:
    restored = checkpoint.restore_latest_good(manager, state)
    if restored is not None:
      state = restored
      logging.info('Resuming from the checkpoint of step %d in %s', int(state.step), workdir)
    start_step = int(state.step)
    if start_step >= total_steps:
      logging.info('Training is already complete: step %d of %d. Nothing to do.', start_step, total_steps)
      return {}
    # What evaluation needs besides the fingerprint, so it works after the training data is gone.
    save_run_files(
      workdir,
      config,
      {**fingerprint, 'pixel_mean': list(mean), 'pixel_std': list(std), 'steps_per_epoch': steps_per_epoch},
    )
    if start_step == 0:
      writer.write_hparams({**writers.flatten_hparams(config), 'num_params': num_params})

    train_fn, eval_fn = jit_steps(config, mesh, learning_rate_fn, mean, std, num_classes, steps_per_epoch)
    pipeline = input_pipeline.create_pipeline(config.data.pipeline, train_split, config.batch_size, config.seed, mesh)
    evaluate_fn = lambda s: evaluate(eval_fn, s, pipeline.eval_batches(test_split, config.eval_batch_size))
    loop = TrainLoop(config, pipeline, train_fn, evaluate_fn, manager, writer, total_steps, eval_every_steps)
    eval_metrics = loop.run(state, start_step)
  finally:
    try:
      checkpoint.wait_until_finished(manager)
    finally:
      manager.close()
      writer.flush()
  if jax.process_index() == 0:
    plots.write_training_curves(workdir, steps_per_epoch)
  return eval_metrics


def _merge(collections):
  return functools.reduce(lambda a, b: a.merge(b), collections)
