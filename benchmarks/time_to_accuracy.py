"""Time to accuracy: trains a config over several seeds; reports training time and test accuracy.

On one GPU (the GPU machine: carry [".carry"], see ../shared/device/pack-carry), configs/fast.py, 5 seeds:

  source .carry/setup.sh && python benchmarks/time_to_accuracy.py

Any config file, with `--config.field=value` overrides as main.py takes them, e.g. a quick check on a
CPU with the real images:

  python benchmarks/time_to_accuracy.py --config=configs/quick.py --config.num_epochs=0.2 --seeds=1 \
      --data_path=<cifar10-jpeg>

`--data_path` (default $CIFAR10_JPEG_DIR) sets `data.source=folder` and `data.path`. Seeds 0 .. --seeds - 1
each run `trainer.train_and_evaluate` in a fresh temporary workdir. Per seed it measures:
- wall_s: the whole `train_and_evaluate` call: loading the data (decoded and cached beforehand),
  initialisation, compilation, every training step, the evaluations and checkpoints the config asks
  for (every `eval_every_epochs` and at the end), and the training-curves plot.
- compile_s: the part of wall_s that JAX spent compiling: tracing, lowering and XLA compilation (GPU
  autotuning included) of every jitted function (init, train step, eval step, pipeline), summed from
  `jax.monitoring`'s compile events (`resnet_flax.run.compile_log`). The seed and the learning rate are
  inputs of the train step, so the seeds after the first reuse its program (train_step_compiles: 0).
- train_s = wall_s - compile_s: the time to accuracy reported.
- accuracy: the test accuracy `train_and_evaluate` returns at the end (of the EMA weights where
  `ema_decay` > 0), every test image counted once.
- tta_accuracy: where the config sets `eval.tta`, the accuracy of the last checkpoint with that
  test-time augmentation (`evaluate.evaluate_checkpoint`), outside the timings.
Then the mean, sample standard deviation, min and max of each over the seeds.

Before the seeds, optionally:
- `--tune_learning_rates=a,b,c` [`--tune_steps_per_call=1,8`]: one run per learning rate with
  `--tune_validation_size` training images held out, the rate of the best validation accuracy kept;
  then that rate once more per other `steps_per_call`, the one of the least train_s kept (the steps
  are the same arithmetic however many a call holds). The test split never chooses.
  `--tuned=<that run's JSON>` then sets the chosen values in a later invocation.
- `--fit_epochs`: sets `num_epochs` to what fits before `--deadline`, from two epochs of the config's
  own train step and pipeline timed first (`fit_epochs`).
With `--deadline`, a run is skipped where its estimate (RERUN_MARGIN x the last run; the first:
`--run_estimate_s`) would end past it, and the JSON lists what was skipped and why.
"""

import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # Not this folder: see benchmarks/compression.py.

import ml_collections  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks import common  # noqa: E402
from resnet_flax import data, evaluate  # noqa: E402
from resnet_flax.errors import UserError  # noqa: E402
from resnet_flax.run import compile_log  # noqa: E402
from resnet_flax.train import trainer  # noqa: E402

config_flags.DEFINE_config_file('config', str(ROOT / 'configs' / 'fast.py'), 'Config file, as main.py takes it.')
flags.DEFINE_integer('seeds', 5, 'Runs, with seeds 0 .. seeds - 1.')
flags.DEFINE_string(
  'data_path',
  os.environ.get('CIFAR10_JPEG_DIR', ''),
  'Sets data.source=folder and data.path: the unpacked cifar10-jpeg folder (default $CIFAR10_JPEG_DIR).',
)
flags.DEFINE_list('tune_learning_rates', [], 'Learning rates to choose from on a validation split first.')
flags.DEFINE_list('tune_steps_per_call', [], 'steps_per_call values to choose from (the fastest) after the rate.')
flags.DEFINE_integer('tune_validation_size', 5000, 'Training images held out to choose the learning rate by.')
flags.DEFINE_string('tuned', None, 'The JSON of an earlier --tune_* run: its chosen learning rate and steps_per_call.')
flags.DEFINE_bool('fit_epochs', False, 'Set num_epochs to what fits before --deadline, from one epoch timed first.')
flags.DEFINE_float(
  'run_estimate_s', 0.0, 'Seconds the first run (or the fit) is taken to need, before one has been timed (--deadline).'
)
FLAGS = flags.FLAGS

TRAIN_STEP = 'train_stack'  # The jitted train step's name in the compile events.
FIGURES = ('train_s', 'compile_s', 'wall_s', 'accuracy', 'tta_accuracy')
TUNING_SEED = 1000  # Not among the reported seeds.
TINY = {'tune_validation_size': 20}
# fit_epochs: the share of the time left that epochs may take; the rest covers the evaluations and
# checkpoints after each epoch and the end's plot (~2% of an epoch each on a GPU, measured on none yet).
FIT_SHARE = 0.85
RERUN_MARGIN = 1.2  # A run's estimate: this x the last run's seconds (the first run compiles what the rest reuse).


def run_seed(config: ml_collections.ConfigDict, seed: int) -> dict[str, Any]:
  config = config.copy_and_resolve_references()
  config.seed = seed
  with tempfile.TemporaryDirectory() as workdir:
    with compile_log.CompileLog() as compiling:
      start = time.perf_counter()
      metrics = trainer.train_and_evaluate(config, workdir)
      wall_s = time.perf_counter() - start
    figures = {
      'seed': seed,
      'wall_s': wall_s,
      'compile_s': compiling.seconds,
      'train_s': wall_s - compiling.seconds,
      'train_step_compiles': len(compiling.of(TRAIN_STEP)),
      'accuracy': metrics['accuracy'],
    }
    if config.eval.tta != 'none':
      config.eval.checkpoint = 'latest'
      figures['tta_accuracy'] = evaluate.evaluate_checkpoint(config, workdir)['tta_accuracy']
  return figures


class Runner:
  """Runs `run_seed` within --deadline: a run is skipped where its estimate would end past it. The
  estimate is RERUN_MARGIN x the last run's seconds (compiled programs and autotuning results are
  cached, so the first run is the slowest), before any run `first_estimate_s`."""

  def __init__(self, results: dict[str, Any], save: Callable[[], None], first_estimate_s: float):
    self.results, self.save, self.estimate_s = results, save, first_estimate_s

  def run(self, config: ml_collections.ConfigDict, seed: int, what: str) -> dict[str, Any] | None:
    reason = common.over_budget(what, self.estimate_s)
    if reason:
      print(reason, flush=True)
      self.results['skipped'].append(reason)
      self.save()
      return None
    start = time.perf_counter()
    figures = run_seed(config, seed)
    self.estimate_s = RERUN_MARGIN * (time.perf_counter() - start)
    return figures


def tune(config: ml_collections.ConfigDict, runner: Runner, tuning: dict[str, Any]):
  """Sets `optim.learning_rate` by validation accuracy, then `steps_per_call` by train_s (see the module
  docstring), recording every trial and what was chosen in `tuning`. The config's rate stays unless
  two rates or more were compared."""
  trial_config = config.copy_and_resolve_references()
  trial_config.data.validation_size = FLAGS.tune_validation_size
  trial_config.eval.tta = 'none'
  steps_per_call = [int(n) for n in FLAGS.tune_steps_per_call] or [config.steps_per_call]
  trials, attempted = tuning['trials'], set()

  def trial(learning_rate: float, steps: int):
    if (learning_rate, steps) in attempted:
      return
    attempted.add((learning_rate, steps))
    trial_config.optim.learning_rate, trial_config.steps_per_call = learning_rate, steps
    what = f'tuning run (learning rate {learning_rate:g}, {steps} steps per call)'
    figures = runner.run(trial_config, TUNING_SEED, what)
    if figures:
      trials.append({'learning_rate': learning_rate, 'steps_per_call': steps, **figures})
      runner.save()
      print(f'{what}: validation accuracy {figures["accuracy"]:.4f}, train {figures["train_s"]:.1f} s', flush=True)

  for learning_rate in map(float, FLAGS.tune_learning_rates):
    trial(learning_rate, steps_per_call[0])
  if len(trials) >= 2:
    config.optim.learning_rate = max(trials, key=lambda t: t['accuracy'])['learning_rate']
  for steps in steps_per_call:
    trial(config.optim.learning_rate, steps)
  at_chosen_rate = [t for t in trials if t['learning_rate'] == config.optim.learning_rate]
  if at_chosen_rate:
    config.steps_per_call = min(at_chosen_rate, key=lambda t: t['train_s'])['steps_per_call']
  tuning['chosen'] = {'learning_rate': config.optim.learning_rate, 'steps_per_call': config.steps_per_call}
  print(f'chosen: {tuning["chosen"]} ({len(trials)} tuning runs)', flush=True)


def tuning_asked() -> bool:
  return bool(FLAGS.tune_learning_rates or FLAGS.tune_steps_per_call)


def fit_epochs(config: ml_collections.ConfigDict, split: data.ImageData) -> dict[str, Any]:
  """Sets `num_epochs` to what fits before --deadline. Times the config's train step over its pipeline
  for two epochs of `split`: the first holds the compilation that the run will repeat (with its schedule's
  length as a new constant), the second is the epoch's time. Then num_epochs = the whole epochs in
  FIT_SHARE of the time left after one more compilation, never more than the config's."""
  jax_trainer = common.create_jax_trainer(config, split)
  pipeline = jax_trainer.pipeline(split)
  first_s, epoch_s = common.time_calls(lambda: jax_trainer.run_epoch(pipeline, config.steps_per_call), repeats=2)
  compile_s = max(first_s - epoch_s, 0.0)
  left_s = common.seconds_left()
  config.num_epochs = min(config.num_epochs, float(math.floor((FIT_SHARE * left_s - compile_s) / epoch_s)))
  fit = {'epoch_s': epoch_s, 'compile_s': compile_s, 'seconds_left': left_s, 'num_epochs': config.num_epochs}
  print(f'fit: {config.num_epochs:g} epochs of {epoch_s:.2f} s in {left_s:.0f} s left', flush=True)
  return fit


def apply_tuned(config: ml_collections.ConfigDict, tuning_json: str) -> float | None:
  """Sets what an earlier tuning run (its results JSON) chose, where it finished; returns its last trial's
  seconds, if any."""
  try:
    tuning = json.loads(Path(tuning_json).read_text())['results']['tuning']
    trials = tuning['trials']
  except (OSError, ValueError, KeyError, TypeError) as e:
    sys.exit(f'error: --tuned={tuning_json}: not the JSON of a tuning run ({e!r})')
  chosen = tuning.get('chosen')
  if chosen:
    config.optim.learning_rate, config.steps_per_call = chosen['learning_rate'], chosen['steps_per_call']
    print(f'tuned values from {tuning_json}: {chosen}')
  else:
    print(f"{tuning_json}: the tuning did not finish (stopped): keeping the config's values")
  return trials[-1]['wall_s'] if trials else None


def summarize(values: Sequence[float]) -> dict[str, float | None]:
  return {
    'mean': statistics.mean(values),
    'std': statistics.stdev(values) if len(values) > 1 else None,
    'min': min(values),
    'max': max(values),
  }


def summaries(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
  return {name: summarize([run[name] for run in runs]) for name in FIGURES if runs and name in runs[0]}


def measure(
  config: ml_collections.ConfigDict,
  seeds: Sequence[int],
  first_estimate_s: float,
  save: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
  """Tuning or fitting where asked, then per-seed figures and their summaries, handed to `save` after
  each run (a part stopped from outside keeps what it measured); the data is loaded (and cached) once
  first, untimed."""
  start = time.perf_counter()
  splits = data.load_splits(config.data)
  results: dict[str, Any] = {'data_load_s': time.perf_counter() - start, 'runs': [], 'skipped': [], 'summary': {}}
  runner = Runner(results, lambda: save(results), first_estimate_s)
  if tuning_asked():
    results['tuning'] = {'validation_size': FLAGS.tune_validation_size, 'seed': TUNING_SEED, 'trials': []}
    tune(config, runner, results['tuning'])
  if FLAGS.fit_epochs:
    seeds = seeds if fit_within_deadline(config, splits['train'], results) else []
    runner.estimate_s = 0.0  # The fit is the estimate.
  for seed in seeds:
    figures = runner.run(config, seed, f'seed {seed}')
    if figures:
      results['runs'].append(figures)
      results['summary'] = summaries(results['runs'])
      print(seed_line(figures), flush=True)
      save(results)
  save(results)
  return results


def fit_within_deadline(config: ml_collections.ConfigDict, split: data.ImageData, results: dict[str, Any]) -> bool:
  """`fit_epochs`, where the fit itself (--run_estimate_s) fits; False, saying why, where no epoch fits."""
  reason = common.over_budget('the fit of the epochs', FLAGS.run_estimate_s)
  if not reason:
    results['fit'] = fit_epochs(config, split)
    if config.num_epochs >= 1:
      return True
    reason = f'every seed skipped: not one epoch fits in the {results["fit"]["seconds_left"]:.0f} s left'
  print(reason, flush=True)
  results['skipped'].append(reason)
  return False


def seed_line(run: dict[str, Any]) -> str:
  tta = f' (TTA {run["tta_accuracy"]:.4f})' if 'tta_accuracy' in run else ''
  return (
    f'seed {run["seed"]}: accuracy {run["accuracy"]:.4f}{tta}; train {run["train_s"]:.1f} s '
    f'= wall {run["wall_s"]:.1f} s - compile {run["compile_s"]:.1f} s'
  )


def mean_std(stats: dict[str, float | None], value_format: str) -> str:
  std = 'n/a' if stats['std'] is None else format(stats['std'], value_format)
  return (
    f'{stats["mean"]:{value_format}} ± {std} (min {stats["min"]:{value_format}}, max {stats["max"]:{value_format}})'
  )


def print_summary(config_file: str, summary: dict[str, dict[str, float | None]], num_runs: int):
  print(f'\n{config_file}: {num_runs} seed(s), mean ± std:')
  if not summary:
    return
  print(f'  test accuracy:                     {mean_std(summary["accuracy"], ".4f")}')
  if 'tta_accuracy' in summary:
    print(f'  test accuracy with TTA:            {mean_std(summary["tta_accuracy"], ".4f")}')
  print(f'  training time, compilation out:    {mean_std(summary["train_s"], ".1f")} s')
  print(f'  compilation:                       {mean_std(summary["compile_s"], ".1f")} s')
  print(f'  train_and_evaluate wall time:      {mean_std(summary["wall_s"], ".1f")} s')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)
  if FLAGS.fit_epochs and FLAGS.deadline is None:
    raise app.UsageError('--fit_epochs fits the epochs before --deadline: give one (Unix time)')
  common.apply_tiny(TINY)
  config = FLAGS.config
  if FLAGS.tiny:
    FLAGS.seeds = min(FLAGS.seeds, 1)
    config = common.tiny(config)
  if FLAGS.data_path:
    config.data.source, config.data.path = 'folder', FLAGS.data_path
  first_estimate_s = FLAGS.run_estimate_s
  if FLAGS.tuned:
    last_trial_s = apply_tuned(config, FLAGS.tuned)
    if last_trial_s:
      first_estimate_s = RERUN_MARGIN * last_trial_s
  device = common.jax_device()
  config_file = os.path.relpath(FLAGS['config'].config_filename, ROOT)
  print(
    f'device: {device}; {config_file}, {FLAGS.seeds} seed(s), {config.num_epochs:g} epochs of '
    f'{config.model.name} on {config.data.source} data {config.data.path}'
  )
  optimizer = [config.optim.name] if config.optim.name != 'sgd' else []  # fast.py with Muon: another JSON.
  variant = ' '.join([Path(config_file).stem, *optimizer] + ['tuning'] * tuning_asked() + ['fit'] * FLAGS.fit_epochs)

  def save(results: dict[str, Any]):
    settings = {
      'config': config_file,
      'seeds': FLAGS.seeds,
      'data_path': config.data.path,
      'config_values': json.loads(config.to_json_best_effort()),
    }
    common.write_results('time_to_accuracy', device, settings, results, variant)

  try:
    results = measure(config, range(FLAGS.seeds), first_estimate_s, save)
  except UserError as e:
    sys.exit(f'error: {e}')
  print_summary(config_file, results['summary'], len(results['runs']))


if __name__ == '__main__':
  app.run(main)
