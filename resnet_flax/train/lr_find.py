"""The learning-rate range test (Smith 2017, "Cyclical learning rates", section 3.3): a plot and a peak rate.

`run_lr_find` trains the config's model from its fresh initial weights with training's own set-up
(`trainer.set_up`: the optimizer, loss, step extensions, augmentation, batch size and pipeline), but with a learning rate that
rises exponentially from `min_lr` to `max_lr` over `num_steps` steps, records each step's loss, and
writes `<workdir>/lr_find/lr_find.json` and `lr_find.png`. It never touches the workdir's checkpoints,
run.json or TensorBoard events, and never uses the test split. It works wherever training does: the
step is training's own (`train_step`, jitted and sharded by `jit_steps`).

- **Compiled loop.** The steps run as a `lax.scan` over a stack of batches (`find_stack`), one call for
  `config.steps_per_call` steps: the knob training has for the same trade-off. XLA:CPU runs convolutions
  inside a loop tens of times slower (jax#12868), so with `steps_per_call=1` (the CPU default) each call
  is one step without a loop, as `train.step.train_stack` runs it; on an accelerator
  `--config.steps_per_call=<num_steps>` makes the finder one scan, cut only at epoch ends (where the
  pipelines start a new order). The host reads the losses after each call and stops once the loss has
  diverged: the steps past that point are not worth their time.
- **Smoothing.** The loss of one batch is noisy: an exponential moving average with bias correction
  (fastai's), whose lag is `SMOOTHING_LAG_DECADES` of a decade of learning rate whatever the number of
  steps. fastai's fixed 0.98 lags 49 steps: over 300 steps and 5 decades that is 0.8 decades, which
  moves the curve's minimum 6x to the right, and with fewer steps further still.
- **Divergence.** The first step whose smoothed loss exceeds `DIVERGENCE_FACTOR` times the lowest
  smoothed loss so far, or is not finite (fastai's rule). The curve ends there.
- **Suggestion.** The geometric middle of the valley: the rates from the first to the last (before the
  divergence) whose smoothed loss lies within `VALLEY_TOLERANCE` of its fall from the first step above
  the lowest. Within the valley every rate trains about as well at that point; its upper end is Smith's
  upper bound (the loss stops falling, turns ragged), its lower end is where faster rates stop paying.
  The middle keeps a margin to both, and a decaying schedule (warmup+cosine, onecycle, step) then
  spends its later steps in the valley's lower half. Not the minimum's rate, nor a fixed fraction of it:
  the floor of the curve is flat and noise places the minimum anywhere on it. On `quick` (CIFAR-10)
  fastai's `minimum` (the minimum / 10) suggested 0.099, the lowest loss being at 0.99, and trained to
  66.11% test accuracy against 70.36% at the default 0.4; the valley, 0.11 to 1.8, suggests 0.43, which
  trained to 70.46%. The valley was the second choice, made after that miss with the curve in view; its
  tolerance matters: 5% would suggest 0.64 there, 20% 0.31. Not the steepest descent either: the
  derivative of a noisy curve is noisier still.

The finder starts from fresh weights: `init_from` (fine-tuning) is refused. Pruning and the EMA of the
weights are left out: neither changes the loss of the first steps much, and both are tied to the
length of a real run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from matplotlib.figure import Figure

from resnet_flax.data import input_pipeline
from resnet_flax.errors import ConfigError
from resnet_flax.run.workdir import check_writable
from resnet_flax.train import config_checks, trainer
from resnet_flax.train.hyperparams import Hyperparams
from resnet_flax.train.step import StepSpec, TrainState, jit_steps, train_step

OUTPUT_DIR = 'lr_find'
DEFAULT_STEPS = 300
DEFAULT_RANGE = (1e-3, 1e2)  # min_lr, max_lr as multiples of config.optim.learning_rate when not given.
SMOOTHING_LAG_DECADES = 0.1  # The moving average's lag, in decades of learning rate.
DIVERGENCE_FACTOR = 4.0
VALLEY_TOLERANCE = 0.1  # Of the loss's fall from the first step: the valley of `suggest`.
# The flags of this mode, and the rate it replaces: left out of the command that trains with the suggestion.
FINDER_FLAGS = ('mode', 'lr_find_steps', 'lr_find_min', 'lr_find_max', 'config.optim.learning_rate')


def exponential_schedule(min_lr: float, max_lr: float, num_steps: int) -> optax.Schedule:
  """min_lr at step 0, max_lr at step num_steps - 1, a constant ratio between consecutive steps."""
  return optax.exponential_decay(min_lr, transition_steps=num_steps - 1, decay_rate=max_lr / min_lr)


@dataclasses.dataclass(frozen=True)
class Ramp:
  """The range test's schedule as the train step takes one (`StepSpec.schedule`): the config's peak is unused."""

  min_lr: float
  max_lr: float
  num_steps: int

  def at(self, peak: Any) -> optax.Schedule:
    return exponential_schedule(self.min_lr, self.max_lr, self.num_steps)


def find_stack(
  state: TrainState, stack: dict[str, jax.Array], hparams: Hyperparams, args: dict[str, Any], *, spec: StepSpec
) -> tuple[TrainState, dict[str, jax.Array]]:
  """`train_step` on each batch of a stack [steps, B, ...]: the state after them, and each step's
  loss and learning rate [steps]. One step runs without a loop, as in `train.step.train_stack` (jax#12868)."""

  def step(state, batch):
    state, step_metrics = train_step(state, batch, hparams, args, spec=spec)
    return state, {'loss': step_metrics.loss.compute(), 'learning_rate': step_metrics.learning_rate.compute()}

  if stack['label'].shape[0] == 1:
    state, record = step(state, jax.tree.map(lambda x: x[0], stack))
    return state, jax.tree.map(lambda x: x[None], record)
  return jax.lax.scan(step, state, stack)


def smoothing_factor(num_steps: int, min_lr: float, max_lr: float) -> float:
  """The moving average's beta for a lag of SMOOTHING_LAG_DECADES (the lag of beta is beta / (1 - beta) steps)."""
  lag = SMOOTHING_LAG_DECADES * (num_steps - 1) / math.log10(max_lr / min_lr)
  return lag / (1 + lag)


def smooth(losses: Sequence[float], beta: float) -> np.ndarray:
  """The bias-corrected exponential moving average of `losses`; not finite from the first loss that is not."""
  smoothed, average = [], 0.0
  for count, loss in enumerate(losses, 1):
    average = beta * average + (1 - beta) * loss
    smoothed.append(average / (1 - beta**count))
  return np.array(smoothed)


def divergence_step(smoothed: np.ndarray) -> int | None:
  """The first step whose smoothed loss is not finite or over DIVERGENCE_FACTOR x the lowest before it."""
  best = np.minimum.accumulate(np.where(np.isfinite(smoothed), smoothed, np.inf))
  diverged = ~np.isfinite(smoothed) | (smoothed > DIVERGENCE_FACTOR * best)
  return int(np.argmax(diverged)) if diverged.any() else None


def suggest(rates: np.ndarray, smoothed: np.ndarray) -> dict[str, Any]:
  """The suggested peak rate (2 significant digits), the valley it is the middle of and the rate of the lowest
  smoothed loss, of a curve that ends before any divergence.

  The valley spans the rates from the first to the last whose smoothed loss lies within VALLEY_TOLERANCE
  of the fall (first smoothed loss - lowest) above the lowest; the suggestion is its geometric middle.
  """
  lowest = np.min(smoothed)
  inside = np.flatnonzero(smoothed <= lowest + VALLEY_TOLERANCE * (smoothed[0] - lowest))
  valley = [float(rates[inside[0]]), float(rates[inside[-1]])]
  return {
    'suggested_learning_rate': float(f'{math.sqrt(valley[0] * valley[1]):.2g}'),
    'valley': valley,
    'min_loss_learning_rate': float(rates[np.argmin(smoothed)]),
  }


def train_command(argv: Sequence[str], learning_rate: float) -> str:
  """`argv` (of main.py) as the command that trains with `learning_rate`: without this mode's flags."""
  kept, skip_value = [], False
  for arg in argv[1:]:
    if skip_value:
      skip_value = False
      continue
    if arg.startswith('--') and arg[2:].split('=')[0] in FINDER_FLAGS:
      skip_value = '=' not in arg  # `--mode lr_find`: the value is the next argument.
      continue
    kept.append(arg)
  return shlex.join(['python', argv[0], *kept, f'--config.optim.learning_rate={learning_rate:g}'])


def check_settings(config: ml_collections.ConfigDict, num_steps: int, min_lr: float, max_lr: float) -> None:
  if num_steps < 2:
    raise ConfigError(f'--lr_find_steps={num_steps} is too few: the range test needs at least 2 steps')
  if not 0 < min_lr < max_lr:
    raise ConfigError(
      f'--lr_find_min={min_lr:g} and --lr_find_max={max_lr:g} are no range: choose 0 < lr_find_min < lr_find_max'
    )
  if config.init_from:
    raise ConfigError(
      f'--mode=lr_find starts from fresh weights, not from --config.init_from={config.init_from!r}: '
      'leave init_from empty to find the rate of a run from scratch'
    )


def record_losses(train_fn, state, pipeline, lengths: Sequence[int], beta: float) -> dict[str, list[float]]:
  """Each step's loss and rate, call after call, until the calls end or the smoothed loss diverges."""
  record, total = {'loss': [], 'learning_rate': []}, sum(lengths)
  log_every = max(1, total // 10)
  for stack in pipeline.train_batches(0, lengths):
    state, stack_record = train_fn(state, stack)
    for key, values in jax.device_get(stack_record).items():
      record[key].extend(float(v) for v in values)
    step, rate, smoothed = len(record['loss']), record['learning_rate'][-1], smooth(record['loss'], beta)
    if divergence_step(smoothed) is not None:
      logging.info('lr_find: the loss diverged at step %d of %d (rate %.3g): stopping', step, total, rate)
      break
    if step // log_every > (step - len(stack_record['loss'])) // log_every:
      logging.info('lr_find: step %d of %d, rate %.3g, smoothed loss %.4f', step, total, rate, smoothed[-1])
  return record


def run_lr_find(
  config: ml_collections.ConfigDict,
  workdir: str,
  num_steps: int = DEFAULT_STEPS,
  min_lr: float | None = None,
  max_lr: float | None = None,
  argv: Sequence[str] | None = None,
) -> dict[str, Any]:
  """The range test from `min_lr` to `max_lr` (default: DEFAULT_RANGE times the config's rate) in
  `num_steps` steps: writes `<workdir>/lr_find/lr_find.json` and `lr_find.png`, returns the JSON's
  contents. `argv` (default sys.argv) is main.py's command line, for the command that trains with the
  suggestion."""
  min_lr = DEFAULT_RANGE[0] * config.optim.learning_rate if min_lr is None else min_lr
  max_lr = DEFAULT_RANGE[1] * config.optim.learning_rate if max_lr is None else max_lr
  config_checks.validate(config)
  check_settings(config, num_steps, min_lr, max_lr)
  check_writable(workdir)
  train_fn, state, pipeline = compile_finder(config, workdir, Ramp(min_lr, max_lr, num_steps))
  lengths = input_pipeline.call_lengths(0, num_steps, config.steps_per_call, (pipeline.steps_per_epoch,))
  beta = smoothing_factor(num_steps, min_lr, max_lr)
  logging.info(
    'lr_find: %d steps, learning rate %.3g to %.3g (x%.4g a step), %d calls of at most %d steps',
    num_steps,
    min_lr,
    max_lr,
    (max_lr / min_lr) ** (1 / (num_steps - 1)),
    len(lengths),
    config.steps_per_call,
  )
  record = record_losses(train_fn, state, pipeline, lengths, beta)
  result = summarize(config, record, beta, num_steps, min_lr, max_lr, sys.argv if argv is None else argv)
  logging.info(
    'lr_find: suggested peak learning rate %g (the middle of the valley %.3g..%.3g); train with it:\n  %s',
    result['suggested_learning_rate'],
    *result['valley'],
    result['train_command'],
  )
  if jax.process_index() == 0:
    write_outputs(result, os.path.join(workdir, OUTPUT_DIR))
  return result


def compile_finder(
  config: ml_collections.ConfigDict, workdir: str, schedule: Ramp
) -> tuple[Callable, TrainState, input_pipeline.InputPipeline]:
  """Training's own set-up (`trainer.set_up`) with `schedule`, without pruning and the EMA: the
  compiled `find_stack` step, the fresh initial state (replicated) and the input pipeline."""
  setup = trainer.set_up(finder_config(config), workdir, schedule)
  pipeline = input_pipeline.create_pipeline(
    config.data.pipeline, setup.train_split, config.batch_size, config.seed, setup.mesh, sampling=config.data.sampling
  )
  train_fn, _ = jit_steps(setup.spec, setup.mesh, setup.hparams, stack_fn=find_stack)
  return train_fn, setup.state, pipeline


def finder_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` less pruning and the EMA of the weights: both are tied to the length of a real run."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.prune.sparsity, config.ema_decay = 0.0, 0.0
  return config


def summarize(
  config: ml_collections.ConfigDict,
  record: dict[str, list[float]],
  beta: float,
  num_steps: int,
  min_lr: float,
  max_lr: float,
  argv: Sequence[str],
) -> dict[str, Any]:
  """lr_find.json's contents: the suggestion, the command that trains with it, the curves and the settings."""
  rates, losses = np.array(record['learning_rate']), np.array(record['loss'])
  smoothed = smooth(losses, beta)
  diverged = divergence_step(smoothed)
  end = len(losses) if diverged is None else diverged
  if end < 2:
    raise ConfigError(f'the loss diverged at once, at learning rate {rates[0]:.3g}: lower --lr_find_min')
  suggestion = suggest(rates[:end], smoothed[:end])
  warnings = []
  if np.argmin(smoothed[:end]) < end // 10:
    warnings.append(f'the smoothed loss was lowest at the first rates: lower --lr_find_min (now {min_lr:.3g})')
  if diverged is None:
    warnings.append(f'the loss did not diverge up to {max_lr:.3g}: raise --lr_find_max to see where it does')
  for warning in warnings:
    logging.warning('lr_find: %s', warning)
  finite_or_none = lambda values: [float(v) if np.isfinite(v) else None for v in values]
  return {
    **suggestion,
    'train_command': train_command(argv, suggestion['suggested_learning_rate']),
    'diverged_step': diverged,
    'diverged_learning_rate': None if diverged is None else float(rates[diverged]),
    'warnings': warnings,
    'settings': {
      'num_steps': num_steps,
      'steps_run': len(losses),
      'min_lr': min_lr,
      'max_lr': max_lr,
      'smoothing_beta': beta,
      'divergence_factor': DIVERGENCE_FACTOR,
      'valley_tolerance': VALLEY_TOLERANCE,
      'model': config.model.name,
      'optimizer': config.optim.name,
      'schedule': config.optim.schedule,
      'config_learning_rate': config.optim.learning_rate,
      'batch_size': config.batch_size,
      'steps_per_call': config.steps_per_call,
      'devices': jax.device_count(),
    },
    'learning_rates': rates.tolist(),
    'losses': finite_or_none(losses),
    'smoothed_losses': finite_or_none(smoothed),
  }


def write_outputs(result: dict[str, Any], directory: str) -> None:
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'lr_find.json'), 'w') as f:
    json.dump(result, f, indent=2)
  plot(result, os.path.join(directory, 'lr_find.png'))


def plot(result: dict[str, Any], path: str) -> None:
  """Loss against learning rate (log axis): each step's, smoothed up to the divergence, the suggestion marked."""
  rates = np.array(result['learning_rates'])
  losses, smoothed = (np.array(result[key], dtype=float) for key in ('losses', 'smoothed_losses'))
  end = len(rates) if result['diverged_step'] is None else result['diverged_step']
  figure = Figure(figsize=(7, 4.5), layout='constrained')
  axes = figure.subplots()
  axes.plot(rates, losses, color='tab:blue', alpha=0.3, linewidth=0.8, label='loss of each step')
  axes.plot(rates[:end], smoothed[:end], color='tab:blue', label='smoothed loss')
  suggested, lowest = result['suggested_learning_rate'], result['min_loss_learning_rate']
  low, high = result['valley']
  axes.axvspan(low, high, color='tab:red', alpha=0.08, label=f'valley {low:.2g} to {high:.2g}')
  axes.axvline(suggested, color='tab:red', linestyle='--', label=f'suggested peak rate {suggested:g}')
  axes.axvline(lowest, color='grey', linestyle=':', label=f'lowest smoothed loss, at {lowest:.2g}')
  if result['diverged_step'] is not None:
    axes.axvline(result['diverged_learning_rate'], color='black', linestyle='-.', label='diverged')
  axes.set_xscale('log')
  # From the lowest loss to 1.5 times the fall from the first: the rise before the divergence shows, not its height.
  floor = np.nanmin(smoothed[:end])
  fall = max(smoothed[0] - floor, 0.1)
  axes.set_ylim(floor - 0.1 * fall, floor + 1.5 * fall)
  axes.set_xlabel('learning rate')
  axes.set_ylabel('training loss')
  axes.grid(alpha=0.3, which='both')
  axes.legend(loc='lower left', fontsize=8)
  settings = result['settings']
  axes.set_title(
    f'learning-rate range test: {settings["model"]}, {settings["optimizer"]}, batch {settings["batch_size"]}, '
    f'{settings["steps_run"]} of {settings["num_steps"]} steps',
    fontsize=10,
  )
  figure.savefig(path, dpi=100)
