"""The training driver: set up the data, model, state and mesh, then run the host loop over the compiled
step (`train.step`), resuming from whatever the workdir holds.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from clu import parameter_overview
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_flax import data, models, optim, step_extensions
from resnet_flax.compress import prune
from resnet_flax.data import augment, input_pipeline
from resnet_flax.errors import ConfigError
from resnet_flax.models import layers
from resnet_flax.robust import adversarial
from resnet_flax.run import checkpoint, compile_log, curves, distributed, writers
from resnet_flax.run.workdir import RunInfo, Steps, check_resumable, check_writable
from resnet_flax.train import config_checks, finetune, hyperparams, loop, memory
from resnet_flax.train.step import (
  StepSpec,
  TrainState,
  check_param_budget,
  compute_eval_metrics,
  create_spec,
  create_train_state,
  jit_steps,
)

WHITENING_IMAGES = 5000  # Training images whose 2x2 patches set a whitening stem (airbench's number).


def initial_variables(
  config: ml_collections.ConfigDict, model: flax.linen.Module, train_split: data.ImageData, mean, std
):
  """Initialised weights of `model`, a whitening stem set from the training images, within the budget."""
  note = models.stem_cost_note(config, train_split.images.shape[1])
  if note:
    logging.warning('%s', note)
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
  evaluate_fn: Callable, config: ml_collections.ConfigDict, setup: Setup, pipeline: input_pipeline.InputPipeline
) -> tuple[Callable, adversarial.Guard]:
  """`evaluate_fn` that also measures the overfitting guard's PGD accuracy, and the guard."""
  split, what = adversarial.guard_split(setup.splits, config.eval_batch_size)
  mean, std = setup.spec.mean, setup.spec.std
  apply = lambda variables, pixels: models.apply_to_pixels(setup.model.apply, variables, pixels * 255, mean, std)
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


@dataclasses.dataclass
class Setup:
  """What a training run is made of, set up before its first step: data, model, weights, the step, the state."""

  splits: dict[str, data.ImageData]
  validation: str  # `describe_validation`: '' when the test split stands in (reported only).
  steps: Steps
  model: flax.linen.Module  # As the extensions wrap it (QAT).
  variables: Any  # The initial (or `init_from`) weights, on the host.
  spec: StepSpec  # The compiled step's model, normalisation, schedule, class weights and extensions.
  hparams: hyperparams.Hyperparams  # The values the compiled step takes as an argument.
  mesh: Mesh
  state: TrainState  # Replicated over `mesh`.
  run: RunInfo

  @property
  def train_split(self) -> data.ImageData:
    return self.splits['train']

  @property
  def eval_split(self) -> data.ImageData:
    return self.splits.get('validation', self.splits['test'])


def load_data(config: ml_collections.ConfigDict) -> tuple[dict[str, data.ImageData], str]:
  """The splits and what the validation split is; early stopping never watches the test split."""
  splits = data.load_splits(config.data)
  validation = describe_validation(config.data, splits)
  if config.early_stopping_patience and not validation:
    raise ConfigError(
      f'early_stopping_patience={config.early_stopping_patience} needs a validation split, never the test split: '
      'set --config.data.validation_size=<images>, or add a val/ folder beside train/'
    )
  logging.info('Evaluating on %s', validation or 'the test split (reported only: nothing is chosen by it)')
  return splits, validation


def set_up(config: ml_collections.ConfigDict, workdir: str, schedule: Any = None) -> Setup:
  """Data, step extensions, model, initial weights (`init_from` included), the step's spec, its hyperparameters
  and the replicated state. `schedule` (`.at(peak)`) replaces the config's (the learning-rate finder's)."""
  splits, validation = load_data(config)
  train_split = splits['train']
  steps = Steps.of(config, len(train_split))
  extensions = step_extensions.create_all(config, train_split, steps)
  num_classes = len(train_split.class_names)
  model = step_extensions.fold(extensions, 'wrap_model', models.create_model_from_config(config, num_classes))
  mean, std = augment.channel_stats(train_split.images)
  variables = initial_variables(config, model, train_split, mean, std)
  variables, mean, std, init_from = finetune.apply_init_from(
    config, workdir, variables, train_split.class_names, mean, std
  )
  class_weights = optim.class_weight_vector(config.optim.class_weights, train_split.labels, train_split.class_names)
  spec = create_spec(config, model, steps, mean, std, num_classes, class_weights, extensions, schedule)
  hparams = hyperparams.of(config)
  mesh = distributed.create_mesh()
  state = create_train_state(variables, spec.optimizer(hparams), ema=config.ema_decay > 0)
  state = jax.device_put(state, NamedSharding(mesh, P()))
  run = run_info(config, train_split, spec, init_from, validation)
  return Setup(splits, validation, steps, model, variables, spec, hparams, mesh, state, run)


def run_info(
  config: ml_collections.ConfigDict,
  train_split: data.ImageData,
  spec: StepSpec,
  init_from: dict[str, Any] | None,
  validation: str,
) -> RunInfo:
  """What run.json records of this run (`run.workdir.RunInfo`), the extensions' records included."""
  return RunInfo(
    model_name=config.model.name,
    se_ratio=config.model.se_ratio,
    stem=config.model.stem,
    image_shape=train_split.images.shape[1:],
    class_names=train_split.class_names,
    pixel_mean=spec.mean,
    pixel_std=spec.std,
    steps_per_epoch=spec.steps_per_epoch,
    init_from=init_from,
    resize=config.data.resize,
    validation=validation,
    **{field: value for extension in spec.extensions for field, value in extension.run_record().items()},
  )


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
  setup = set_up(config, workdir)
  check_resumable(workdir, setup.run)
  os.makedirs(workdir, exist_ok=True)
  manager = checkpoint.create_manager(workdir, config.keep_checkpoints, config.checkpoint_every_steps)
  writer = writers.create_writer(workdir, is_primary=jax.process_index() == 0, steps_per_epoch=setup.steps.per_epoch)
  try:
    with compile_log.CompileLog() as compiling:
      eval_metrics = resume_and_train(config, workdir, setup, manager, writer, on_evaluation)
    logging.info('Compiled %s', compiling.summary())
  finally:
    try:
      checkpoint.wait_until_finished(manager)
    finally:
      checkpoint.close(manager)
      writers.flush_at_the_end(writer, workdir)
  if jax.process_index() == 0:
    curves.write_training_curves(workdir, setup.steps.per_epoch)
  return eval_metrics


def resume_and_train(
  config: ml_collections.ConfigDict,
  workdir: str,
  setup: Setup,
  manager: ocp.CheckpointManager,
  writer: Any,  # Of `writers.create_writer`.
  on_evaluation: Callable[[int, dict[str, float]], None] | None,
) -> dict[str, float]:
  """Restores the latest good checkpoint, if any, and trains from there to the end; {} if already done."""
  restored = checkpoint.restore_latest_good(manager, setup.state)
  state = setup.state if restored is None else restored
  start_step = int(jax.device_get(state.step))
  if restored is not None:
    logging.info('Resuming from the checkpoint of step %d in %s', start_step, workdir)
  if start_step >= setup.steps.total:
    logging.info('Training is already complete: step %d of %d. Nothing to do.', start_step, setup.steps.total)
    return {}
  train_loop = create_loop(config, setup, manager, writer, on_evaluation, state, start_step)  # Checks memory first.
  setup.run.save(workdir, config)
  if jax.process_index() == 0:
    writers.drop_csv_rows_after(workdir, start_step)  # Rows a killed run wrote after its last checkpoint.
  if start_step == 0:
    num_params = models.count_params(setup.variables['params'])
    writer.write_hparams({**writers.flatten_hparams(config), 'num_params': num_params})
  return train_loop.run(state, start_step)


def create_loop(
  config: ml_collections.ConfigDict,
  setup: Setup,
  manager: ocp.CheckpointManager,
  writer: Any,  # Of `writers.create_writer`.
  on_evaluation: Callable[[int, dict[str, float]], None] | None,
  state: TrainState,
  start_step: int,
) -> loop.TrainLoop:
  """The compiled steps, checked to fit in memory from `start_step` on (`train.memory`), the input pipeline, the
  evaluation (with the overfitting guard) and the host loop."""
  train_fn, eval_fn = jit_steps(setup.spec, setup.mesh, setup.hparams)
  pipeline = input_pipeline.create_pipeline(
    config.data.pipeline, setup.train_split, config.batch_size, config.seed, setup.mesh, sampling=config.data.sampling
  )
  if config.check_memory:  # After the pipeline: the device pipeline's copy of the split is then in use.
    longest_call = min(config.steps_per_call, setup.steps.per_epoch, setup.steps.total - start_step)
    needs = memory.StepNeeds(setup, train_fn, eval_fn, state, longest_call, config.eval_batch_size)
    memory.check_steps_fit(config, needs)
  eval_batches = lambda: pipeline.eval_batches(setup.eval_split, config.eval_batch_size)
  evaluate_fn = lambda s: compute_eval_metrics(eval_fn, s, eval_batches())
  guard = None
  if config.adversarial.method != 'none' and config.adversarial.guard_drop:
    evaluate_fn, guard = guarded(evaluate_fn, config, setup, pipeline)
  return loop.TrainLoop(
    config,
    setup.steps,
    pipeline,
    train_fn,
    evaluate_fn,
    manager,
    writer,
    validates=bool(setup.validation),
    ranks_from=prune.first_ranked_step(config, setup.steps),
    guard=guard,
    on_evaluation=on_evaluation,
  )
