"""Throughput of the whole training loop of main.py vs the bare jitted train step.

  python benchmarks/loop_overhead.py [--model=resnet_tiny] [--batch_size=256] [--steps=120] [--repeats=3]

The loop figure is what `train_and_evaluate` logs as images/s (data pipeline, metrics, logging and
checkpoints included), after the first logging window (compilation). The bare figure times the same
jitted step on one batch already on the device. Both are medians over `--repeats` runs; the results
also go to `<--output_dir>/loop_overhead_<device>.json`.
"""

import statistics
import sys
import tempfile
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # Not this folder: see benchmarks/compression.py.

from absl import app, flags, logging  # noqa: E402

from benchmarks import common  # noqa: E402
from configs import default  # noqa: E402
from resnet_flax import data  # noqa: E402
from resnet_flax.run import writers  # noqa: E402
from resnet_flax.train import trainer

flags.DEFINE_string('model', 'resnet_tiny', 'Model preset.')
flags.DEFINE_integer('batch_size', 256, 'Global batch size.')
flags.DEFINE_integer('steps', 120, 'Training steps per measurement.')
flags.DEFINE_integer('repeats', 3, 'Measurements of each kind.')
flags.DEFINE_string('pipeline', 'tfdata', 'Input pipeline of the loop: tfdata | device.')
FLAGS = flags.FLAGS

LOG_EVERY = 10
TINY = {'batch_size': 8, 'steps': 2 * LOG_EVERY, 'repeats': 1}  # The loop figure needs a second log window.


def make_config():
  config = default.get_config()
  config.model.name = FLAGS.model
  config.data.source = 'synthetic'
  config.data.pipeline = FLAGS.pipeline
  config.data.synthetic_train_size = FLAGS.batch_size * FLAGS.steps
  config.data.synthetic_test_size = FLAGS.batch_size
  config.batch_size = config.eval_batch_size = FLAGS.batch_size
  config.num_epochs = 1.0
  config.eval_every_epochs = 1.0  # Evaluate once, at the end: not part of the training throughput.
  config.log_every_steps = LOG_EVERY
  config.checkpoint_every_steps = 50
  return config


def loop_images_per_sec(config) -> float:
  with tempfile.TemporaryDirectory() as workdir:
    trainer.train_and_evaluate(config, workdir)
    rates = [v for step, v in writers.read_scalars(workdir)['images_per_sec'] if step > LOG_EVERY]
  return statistics.median(rates)


def bare_step_images_per_sec(config) -> float:
  """The train step alone, on one device-resident batch, state donated from call to call."""
  split = data.load_splits(config.data)['train']
  jax_trainer = common.create_jax_trainer(config, split)
  batch = jax_trainer.device_batch(split)
  jax_trainer.run_on(batch, 1)  # Compiles.
  (seconds,) = common.time_calls(lambda: jax_trainer.run_on(batch, FLAGS.steps), repeats=1)
  return FLAGS.steps * config.batch_size / seconds


def main(_):
  logging.set_verbosity(logging.WARNING)
  common.apply_tiny(TINY)
  config = make_config()
  bare, loop = [], []
  for _ in range(FLAGS.repeats):  # Interleaved, so that a busy spell on the machine hits both alike.
    bare.append(bare_step_images_per_sec(config))
    loop.append(loop_images_per_sec(config))
  device = common.jax_device()
  print(
    f'device: {device}; model {FLAGS.model}, batch {FLAGS.batch_size}, {FLAGS.steps} steps, '
    f'{FLAGS.repeats} repeats, pipeline {FLAGS.pipeline}'
  )
  print(f'bare jitted train step: {common.images_per_sec(bare)}')
  print(f'whole main.py loop:     {common.images_per_sec(loop)}')
  print(f'loop / bare: {statistics.median(loop) / statistics.median(bare):.1%}')
  settings = {
    'model': FLAGS.model,
    'batch_size': FLAGS.batch_size,
    'steps': FLAGS.steps,
    'repeats': FLAGS.repeats,
    'pipeline': FLAGS.pipeline,
  }
  common.write_results(
    'loop_overhead',
    device,
    settings,
    {
      'bare_step_images_per_sec': common.summarize(bare),
      'loop_images_per_sec': common.summarize(loop),
      'loop_over_bare': statistics.median(loop) / statistics.median(bare),
    },
  )


if __name__ == '__main__':
  app.run(main)
