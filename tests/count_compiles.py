"""Trains the smoke config for 3 seeds x 3 learning rates in one process and prints, as JSON, what it compiled
(`run.compile_log`) and each run's final metrics; then the last run again after emptying every in-process cache,
so that it compiles its own program. test_compile_once.py runs it with the persistent cache off.

  python tests/count_compiles.py <workdir>
"""

import itertools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from configs import smoke  # noqa: E402
from resnet_flax.run import compile_log  # noqa: E402
from resnet_flax.train import step, trainer  # noqa: E402

SEEDS = (0, 1, 2)
LEARNING_RATES = (0.02, 0.05, 0.1)


def train(workdir: str, seed: int, learning_rate: float) -> dict[str, float]:
  config = smoke.get_config()
  config.num_epochs, config.checkpoint_every_steps = 0.5, 100  # 4 steps.
  config.seed, config.optim.learning_rate = seed, learning_rate
  return trainer.train_and_evaluate(config, os.path.join(workdir, f'seed{seed}_lr{learning_rate}'))


def main(workdir: str) -> None:
  with compile_log.CompileLog() as shared:
    runs = [(seed, lr, train(workdir, seed, lr)) for seed, lr in itertools.product(SEEDS, LEARNING_RATES)]
  step._compiled.cache_clear()
  jax.clear_caches()
  seed, lr, _ = runs[-1]
  with compile_log.CompileLog() as alone:
    again = train(os.path.join(workdir, 'again'), seed, lr)
  counts = lambda log: {name: len(log.of(name)) for name in ('_init', 'train_stack', 'eval_step')}
  print(json.dumps({'shared': counts(shared), 'alone': counts(alone), 'runs': runs, 'again': again}))


if __name__ == '__main__':
  main(sys.argv[1])
