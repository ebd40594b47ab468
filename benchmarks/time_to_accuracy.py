"""Time to accuracy: trains a config over several seeds; reports training time and test accuracy.

On one GPU (the GPU machine: carry [".carry"], see ../shared/device/pack-carry), configs/fast.py, 5 seeds:

  source .carry/setup.sh && python benchmarks/time_to_accuracy.py

Any config of configs/ by module name, e.g. a quick check on a CPU with the real images:

  python benchmarks/time_to_accuracy.py --config=quick --seeds=1 --num_epochs=0.2 --data_path=<cifar10-jpeg>

`--data_path` (default $CIFAR10_JPEG_DIR) replaces the config's `data.path`. Seeds 0 .. --seeds - 1 each
run `train.train_and_evaluate` in a fresh temporary workdir. Per seed it measures:
- wall_s: the whole `train_and_evaluate` call: loading the data (decoded and cached beforehand),
  initialisation, compilation, every training step, the evaluations and checkpoints the config asks
  for (every `eval_every_epochs` and at the end), and the training-curves plot.
- compile_s: the part of wall_s that JAX spent compiling: tracing, lowering and XLA compilation (GPU
  autotuning included) of every jitted function (init, train step, eval step, pipeline), summed from
  `jax.monitoring`'s compile events (common.CompileTimer). Every seed compiles anew: the seed is a
  constant of the train step.
- train_s = wall_s - compile_s: the time to accuracy reported.
- accuracy: the test accuracy `train_and_evaluate` returns at the end (of the EMA weights where
  `ema_decay` > 0), every test image counted once.
- tta_accuracy: where the config sets `eval.tta`, the accuracy of the last checkpoint with that
  test-time augmentation (`evaluate.evaluate_checkpoint`), outside the timings.
Then the mean, sample standard deviation, min and max of each over the seeds.
"""

import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path[0] = str(Path(__file__).resolve().parents[1])  # Not this folder: see benchmarks/compression.py.

import ml_collections  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from benchmarks import common  # noqa: E402
from resnet_flax import data, evaluate, train  # noqa: E402
from resnet_flax.errors import UserError  # noqa: E402

flags.DEFINE_string('config', 'fast', 'Config module of configs/ (fast, quick, resnet18, ...).')
flags.DEFINE_integer('seeds', 5, 'Runs, with seeds 0 .. seeds - 1.')
flags.DEFINE_string(
  'data_path',
  os.environ.get('CIFAR10_JPEG_DIR', ''),
  'Replaces data.path: the unpacked cifar10-jpeg folder (default $CIFAR10_JPEG_DIR).',
)
flags.DEFINE_float('num_epochs', None, "Replaces num_epochs (default: the config's).")
FLAGS = flags.FLAGS

FIGURES = ('train_s', 'compile_s', 'wall_s', 'accuracy', 'tta_accuracy')


def run_seed(config: ml_collections.ConfigDict, seed: int) -> dict[str, Any]:
  config = config.copy_and_resolve_references()
  config.seed = seed
  with tempfile.TemporaryDirectory() as workdir:
    with common.CompileTimer() as compile_timer:
      start = time.perf_counter()
      metrics = train.train_and_evaluate(config, workdir)
      wall_s = time.perf_counter() - start
    figures = {
      'seed': seed,
      'wall_s': wall_s,
      'compile_s': compile_timer.seconds,
      'train_s': wall_s - compile_timer.seconds,
      'accuracy': metrics['accuracy'],
    }
    if config.eval.tta != 'none':
      config.eval.checkpoint = 'latest'
      figures['tta_accuracy'] = evaluate.evaluate_checkpoint(config, workdir)['tta_accuracy']
  return figures


def summarize(values: Sequence[float]) -> dict[str, float | None]:
  return {
    'mean': statistics.mean(values),
    'std': statistics.stdev(values) if len(values) > 1 else None,
    'min': min(values),
    'max': max(values),
  }


def measure(config: ml_collections.ConfigDict, seeds: Sequence[int]) -> dict[str, Any]:
  """Per-seed figures and their summaries; the data is loaded (and cached) once first, untimed."""
  start = time.perf_counter()
  data.load_splits(config.data)
  data_load_s = time.perf_counter() - start
  runs = []
  for seed in seeds:
    runs.append(run_seed(config, seed))
    print(seed_line(runs[-1]), flush=True)
  summary = {name: summarize([run[name] for run in runs]) for name in FIGURES if name in runs[0]}
  return {'data_load_s': data_load_s, 'runs': runs, 'summary': summary}


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


def print_summary(summary: dict[str, dict[str, float | None]], num_seeds: int):
  print(f'\nconfigs/{FLAGS.config}.py, {num_seeds} seed(s), mean ± std:')
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
  common.apply_tiny({'seeds': 1})
  config = common.load_config(FLAGS.config)
  if FLAGS.tiny:
    config = common.tiny(config)
  elif FLAGS.data_path:
    config.data.path = FLAGS.data_path
  if FLAGS.num_epochs is not None:
    config.num_epochs = FLAGS.num_epochs
  device = common.jax_device()
  print(
    f'device: {device}; configs/{FLAGS.config}.py, {FLAGS.seeds} seed(s), {config.num_epochs:g} epochs of '
    f'{config.model.name} on {config.data.source} data {config.data.path}'
  )
  try:
    results = measure(config, range(FLAGS.seeds))
  except UserError as e:
    sys.exit(f'error: {e}')
  print_summary(results['summary'], FLAGS.seeds)
  settings = {
    'config': f'configs/{FLAGS.config}.py',
    'seeds': FLAGS.seeds,
    'data_path': config.data.path,
    'config_values': json.loads(config.to_json_best_effort()),
  }
  common.write_results('time_to_accuracy', device, settings, results)


if __name__ == '__main__':
  app.run(main)
