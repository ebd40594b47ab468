"""Throughput of the whole training loop of main.py vs the bare jitted train step.

  python benchmarks/loop_overhead.py [--model=resnet_tiny] [--batch_size=256] [--steps=120] [--repeats=3]

The loop figure is what `train_and_evaluate` logs as images/s (data pipeline, metrics, logging and
checkpoints included), after the first logging window (compilation). The bare figure times the same
jitted step on one batch already on the device. Both are medians over `--repeats` runs.
"""

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from configs import default  # noqa: E402
from resnet_flax import augment, data, input_pipeline, models, train, writers  # noqa: E402

flags.DEFINE_string('model', 'resnet_tiny', 'Model preset.')
flags.DEFINE_integer('batch_size', 256, 'Global batch size.')
flags.DEFINE_integer('steps', 120, 'Training steps per measurement.')
flags.DEFINE_integer('repeats', 3, 'Measurements of each kind.')
flags.DEFINE_string('pipeline', 'tfdata', 'Input pipeline of the loop: tfdata | device.')
FLAGS = flags.FLAGS

LOG_EVERY = 10


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
    train.train_and_evaluate(config, workdir)
    rates = [v for step, v in writers.read_scalars(workdir)['images_per_sec'] if step > LOG_EVERY]
  return statistics.median(rates)


def bare_step_images_per_sec(config) -> float:
  """The train step alone, on one device-resident batch, state donated from call to call."""
  splits = data.load_splits(config.data)
  model = train.create_model(config, len(splits['train'].class_names))
  steps_per_epoch = len(splits['train']) // config.batch_size
  learning_rate_fn = train.create_learning_rate_fn(config, steps_per_epoch)
  mesh = train.create_mesh()
  variables = models.init_variables(model, splits['train'].images.shape[1:], jax.random.key(0))
  state = train.create_train_state(model, variables, train.create_optimizer(config, learning_rate_fn))
  mean, std = augment.channel_stats(splits['train'].images)
  train_fn, _ = train.jit_steps(config, mesh, learning_rate_fn, mean, std, len(splits['train'].class_names))
  pipeline = input_pipeline.create_pipeline('device', splits['train'], config.batch_size, 0, mesh)
  batch = next(pipeline.train_batches(0, 1))
  state, _ = train_fn(state, batch)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(FLAGS.steps):
    state, _ = train_fn(state, batch)
  jax.block_until_ready(state)
  return FLAGS.steps * config.batch_size / (time.perf_counter() - start)


def main(_):
  logging.set_verbosity(logging.WARNING)
  config = make_config()
  bare = [bare_step_images_per_sec(config) for _ in range(FLAGS.repeats)]
  loop = [loop_images_per_sec(config) for _ in range(FLAGS.repeats)]
  describe = lambda xs: f'median {statistics.median(xs):,.0f} images/s (min {min(xs):,.0f}, max {max(xs):,.0f})'
  print(f'device: {jax.devices()[0].device_kind} x{jax.device_count()}; model {FLAGS.model}, '
        f'batch {FLAGS.batch_size}, {FLAGS.steps} steps, {FLAGS.repeats} repeats, pipeline {FLAGS.pipeline}')
  print(f'bare jitted train step: {describe(bare)}')
  print(f'whole main.py loop:     {describe(loop)}')
  print(f'loop / bare: {statistics.median(loop) / statistics.median(bare):.1%}')


if __name__ == '__main__':
  app.run(main)
