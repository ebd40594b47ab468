"""Two recipes side by side: the same data, seeds and epochs; mean test accuracy, train seconds and, where the
comparison asks, the mean accuracy over CIFAR-10-C's corruptions, each the mean over seeds with its spread.

  python benchmarks/side_by_side.py --comparison=muon_vs_sgd --data_path=<unpacked cifar10-jpeg>
  python benchmarks/side_by_side.py --comparison=augmix_vs_plain --data_path=<unpacked cifar10-jpeg>
  python benchmarks/side_by_side.py --comparison=muon_vs_sgd --tiny          # a CPU check in seconds

A comparison (COMPARISONS) is a base config file with overrides and its variants, each a function of the config.
Per variant and seed, in one process and a fresh workdir: `trainer.train_and_evaluate`, timed; train_s is that
wall time less what JAX spent compiling (`run.compile_log`), so the variant that compiles first pays nothing
extra. With `corruptions`, then `evaluate.evaluate_checkpoint` with eval.corruptions=all on the generator's
`eval.corruption_examples` (1,000) test images. Seeds alternate between the variants, so a machine that slows
down mid-run slows both. JSON: side_by_side_<device>_<comparison>.json.
"""

from __future__ import annotations

import dataclasses
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

from benchmarks import common  # noqa: E402
from configs import augmix  # noqa: E402
from resnet_flax import evaluate  # noqa: E402
from resnet_flax.run import compile_log  # noqa: E402
from resnet_flax.train import trainer  # noqa: E402

Variant = Callable[[ml_collections.ConfigDict], ml_collections.ConfigDict]


def _muon(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  config.optim.name = 'muon'
  return config


@dataclasses.dataclass(frozen=True)
class Comparison:
  base: str  # A file of configs/.
  overrides: dict[str, Any]  # Dotted fields set on it for every variant.
  variants: dict[str, Variant]  # Name -> what it changes; the first is the reference.
  corruptions: bool = False  # Also the mean accuracy over CIFAR-10-C's corruptions.


COMPARISONS = {
  'muon_vs_sgd': Comparison('quick', {'data.train_examples': 20000}, {'sgd': lambda c: c, 'muon': _muon}),
  'augmix_vs_plain': Comparison(
    'quick', {'data.train_examples': 10000}, {'plain': lambda c: c, 'augmix': augmix.add_augmix}, corruptions=True
  ),
}

flags.DEFINE_enum('comparison', None, list(COMPARISONS), 'Which comparison to run.')
flags.DEFINE_integer('seeds', 2, 'Runs of each variant, with seeds 0 .. seeds - 1.')
flags.DEFINE_string(
  'data_path', os.environ.get('CIFAR10_JPEG_DIR', ''), 'The unpacked cifar10-jpeg folder (default $CIFAR10_JPEG_DIR).'
)
flags.mark_flag_as_required('comparison')
FLAGS = flags.FLAGS


def variant_config(comparison: Comparison, variant: str, seed: int) -> ml_collections.ConfigDict:
  config = common.load_config(comparison.base)
  config.update_from_flattened_dict(comparison.overrides)
  config = comparison.variants[variant](config)
  config.seed = seed
  if FLAGS.tiny:
    config = common.tiny(config)
  elif FLAGS.data_path:
    config.data.source, config.data.path = 'folder', FLAGS.data_path
  return config


def run(comparison: Comparison, variant: str, seed: int) -> dict[str, Any]:
  """One training of `variant` with `seed`, timed, and its evaluations."""
  config = variant_config(comparison, variant, seed)
  with tempfile.TemporaryDirectory() as workdir:
    with compile_log.CompileLog() as compiling:
      start = time.perf_counter()
      metrics = trainer.train_and_evaluate(config, workdir)
      wall_s = time.perf_counter() - start
    figures = {'seed': seed, 'train_s': wall_s - compiling.seconds, 'compile_s': compiling.seconds}
    figures['accuracy'] = metrics['accuracy']
    if comparison.corruptions:
      config.eval.corruptions, config.eval.corruption_cache_dir = 'all', ''
      report = evaluate.evaluate_checkpoint(config, workdir)
      figures['corruption_accuracy'] = report['corruptions']['mean_accuracy']
  print(f'{variant} seed {seed}: ' + ', '.join(f'{k} {v:.4g}' for k, v in figures.items() if k != 'seed'))
  return figures


def mean_and_spread(values: Sequence[float]) -> dict[str, Any]:
  spread = statistics.stdev(values) if len(values) > 1 else None
  return {'mean': statistics.fmean(values), 'stdev': spread, 'min': min(values), 'max': max(values)}


def summary(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
  names = [name for name in runs[0] if name != 'seed']
  return {name: mean_and_spread([r[name] for r in runs]) for name in names}


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)
  comparison = COMPARISONS[FLAGS.comparison]
  runs: dict[str, list[dict[str, Any]]] = {variant: [] for variant in comparison.variants}
  for seed in range(1 if FLAGS.tiny else FLAGS.seeds):
    for variant in comparison.variants:
      runs[variant].append(run(comparison, variant, seed))
  results = {variant: {'summary': summary(r), 'runs': r} for variant, r in runs.items()}
  for variant, result in results.items():
    line = ', '.join(f'{k} {v["mean"]:.4g} ± {v["stdev"] or 0:.2g}' for k, v in result['summary'].items())
    print(f'{variant}: {line}')
  settings = {'base': comparison.base, 'overrides': comparison.overrides, 'seeds': FLAGS.seeds}
  settings['data_path'] = FLAGS.data_path
  common.write_results('side_by_side', common.jax_device(), settings, results, FLAGS.comparison)


if __name__ == '__main__':
  app.run(main)
