"""What training compiles, in seconds and programs: the seeds of a recipe in one process, and the trials of a
sweep in one process each.

  python benchmarks/compile_once.py --data_path=<unpacked cifar10-jpeg>

- seeds: `--seeds` (5) runs of configs/fast.py at --tiny size (`common.tiny`), one after another in this process,
  as benchmarks/time_to_accuracy.py runs them;
- sweep: `--trials` (4) runs of configs/quick.py on `TRIAL_EXAMPLES` training images, each with its own seed and
  learning rate, each in a process of its own sharing one fresh persistent compilation cache, as
  `python -m resnet_flax.sweep` runs trials (with the folder at --data_path; synthetic images without one).
Per run: compile_s (tracing, lowering and XLA, from `resnet_flax.run.compile_log`), the programs compiled, and
the train step's compilations (how many, seconds, whether the persistent cache served them).
Comparing before and after a change: run it in each checkout (an older one needs run/compile_log.py copied in).
JSON: compile_once_<device>.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # Not this folder: see benchmarks/compression.py.

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from benchmarks import common  # noqa: E402
from resnet_flax.run import compile_log  # noqa: E402
from resnet_flax.train import trainer  # noqa: E402

TRAIN_STEP = 'train_stack'
TRIAL_EXAMPLES = 2000  # A subset, as a short sweep uses (data.train_examples).
TRIAL_LEARNING_RATES = (0.2, 0.4, 0.8, 0.1)  # One per trial, with seeds 0, 1, 2, 3.

flags.DEFINE_integer('seeds', 5, 'Runs of configs/fast.py at --tiny size in this process.')
flags.DEFINE_integer('trials', 4, 'Sweep trials of configs/quick.py, a process each.', upper_bound=4)
flags.DEFINE_string(
  'data_path', os.environ.get('CIFAR10_JPEG_DIR', ''), 'The unpacked cifar10-jpeg folder (default $CIFAR10_JPEG_DIR).'
)
flags.DEFINE_integer('trial', None, 'Internal: run this trial here and print its figures as JSON.')
flags.DEFINE_string('compilation_cache_dir', None, "Internal: the trials' persistent compilation cache.")
FLAGS = flags.FLAGS


def train_and_log(config, **labels: Any) -> dict[str, Any]:
  """Trains `config` in a fresh workdir; its compile figures, after `labels`."""
  with tempfile.TemporaryDirectory() as workdir, compile_log.CompileLog() as compiling:
    start = time.perf_counter()
    trainer.train_and_evaluate(config, workdir)
    wall_s = time.perf_counter() - start
  steps = compiling.of(TRAIN_STEP)
  return {
    **labels,
    'wall_s': wall_s,
    'compile_s': compiling.seconds,
    'programs_compiled': sum(not c.cache_hit for c in compiling.compilations),
    'programs_from_cache': sum(c.cache_hit for c in compiling.compilations),
    'train_step': [{'seconds': c.seconds, 'cache_hit': c.cache_hit} for c in steps],
  }


def seeds_in_one_process() -> list[dict[str, Any]]:
  runs = []
  for seed in range(FLAGS.seeds):
    config = common.tiny(common.load_config('fast'))
    config.seed = seed
    runs.append(train_and_log(config, seed=seed))
    print(f'seed {seed}: {runs[-1]["compile_s"]:.1f} s compiling, train step {runs[-1]["train_step"]}')
  return runs


def trial_config(trial: int):
  config = common.load_config('quick')
  config.seed, config.optim.learning_rate = trial, TRIAL_LEARNING_RATES[trial]
  config.num_epochs, config.eval_every_epochs = 0.25, 1.0
  if FLAGS.data_path:
    config.data.source, config.data.path = 'folder', FLAGS.data_path
    config.data.train_examples = TRIAL_EXAMPLES
  else:
    config.data.source, config.data.synthetic_train_size = 'synthetic', TRIAL_EXAMPLES
  return config


def run_trial(trial: int) -> None:
  """One trial in this process, with the persistent cache of --compilation_cache_dir: its figures as JSON."""
  jax.config.update('jax_compilation_cache_dir', FLAGS.compilation_cache_dir)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)  # As main.py sets it (cli).
  print(json.dumps(train_and_log(trial_config(trial), trial=trial, learning_rate=TRIAL_LEARNING_RATES[trial])))


def sweep_trials() -> list[dict[str, Any]]:
  runs = []
  with tempfile.TemporaryDirectory() as cache:
    for trial in range(FLAGS.trials):
      command = [sys.executable, __file__, f'--trial={trial}', f'--compilation_cache_dir={cache}']
      output = subprocess.run(
        [*command, f'--data_path={FLAGS.data_path}'], capture_output=True, text=True, check=True, cwd=ROOT
      ).stdout
      runs.append(json.loads(output.strip().splitlines()[-1]))
      print(f'trial {trial}: {runs[-1]["compile_s"]:.1f} s compiling, train step {runs[-1]["train_step"]}')
  return runs


def totals(runs: list[dict[str, Any]]) -> dict[str, float]:
  return {
    'compile_s': sum(r['compile_s'] for r in runs),
    'train_step_compiles': sum(not c['cache_hit'] for r in runs for c in r['train_step']),
    'train_step_cache_hits': sum(c['cache_hit'] for r in runs for c in r['train_step']),
  }


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)
  if FLAGS.trial is not None:
    return run_trial(FLAGS.trial)
  seeds, trials = seeds_in_one_process(), sweep_trials()
  results = {'seeds': {'runs': seeds, 'total': totals(seeds)}, 'sweep': {'runs': trials, 'total': totals(trials)}}
  for part in ('seeds', 'sweep'):
    print(f'{part}: {results[part]["total"]}')
  settings = {'seeds': FLAGS.seeds, 'trials': FLAGS.trials, 'trial_examples': TRIAL_EXAMPLES}
  common.write_results('compile_once', common.jax_device(), {**settings, 'data_path': FLAGS.data_path}, results)


if __name__ == '__main__':
  app.run(main)
