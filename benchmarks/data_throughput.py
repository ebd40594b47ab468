"""Input pipeline throughput and the cost of on-device augmentation.

  python benchmarks/data_throughput.py [--batch_size=512] [--steps=300] [--repeats=5]

1. images/s of the host `tfdata` pipeline on ONE CPU core (the process is pinned to core 0 and
   TensorFlow to one thread), from in-memory CIFAR-sized uint8 arrays, delivered as global jax
   arrays: what the train step receives.
2. time of the jitted augmentation (crop, flip, cutout) of one batch vs one `resnet18` train step
   on the same device and batch.
Figures are medians over `--repeats`, with the min-max spread.
"""

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from configs import default  # noqa: E402
from resnet_flax import augment, input_pipeline, models, train  # noqa: E402
from resnet_flax.data import ImageData  # noqa: E402

flags.DEFINE_integer('batch_size', 512, 'Global batch size.')
flags.DEFINE_integer('steps', 300, 'Batches per pipeline measurement.')
flags.DEFINE_integer('repeats', 5, 'Measurements of each kind.')
flags.DEFINE_integer('step_repeats', 3, 'Timed resnet18 train steps per measurement (slow on CPU).')
FLAGS = flags.FLAGS


def cifar_sized_split(num_images: int = 50_000) -> ImageData:
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (num_images, 32, 32, 3), dtype=np.uint8)
  return ImageData(images, rng.integers(0, 10, num_images).astype(np.int32), tuple(map(str, range(10))))


def pin_to_one_core():
  os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  import tensorflow as tf

  tf.config.threading.set_inter_op_parallelism_threads(1)
  tf.config.threading.set_intra_op_parallelism_threads(1)


def tfdata_images_per_sec(split: ImageData) -> float:
  pipeline = input_pipeline.create_pipeline('tfdata', split, FLAGS.batch_size, 0, train.create_mesh())
  batches = pipeline.train_batches(0, FLAGS.steps + 10)
  for _ in range(10):  # Start-up: the graph, the first permutation, the prefetch buffer.
    jax.block_until_ready(next(batches))
  start = time.perf_counter()
  for batch in batches:
    jax.block_until_ready(batch)
  return FLAGS.steps * FLAGS.batch_size / (time.perf_counter() - start)


def seconds_per_call(fn, *args, calls: int) -> float:
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(calls):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / calls


def augment_vs_step_seconds(split: ImageData) -> tuple[float, float]:
  config = default.get_config()
  config.augment.train_ops = ('crop', 'flip', 'cutout')
  config.batch_size = FLAGS.batch_size
  mean, std = augment.channel_stats(split.images)
  batch = next(input_pipeline.create_pipeline('device', split, FLAGS.batch_size, 0, train.create_mesh())
               .train_batches(0, 1))
  augment_fn = jax.jit(lambda images, key: augment.augment_batch(images, key, config.augment, mean, std))
  augment_seconds = seconds_per_call(augment_fn, batch['image'], jax.random.key(0), calls=20)

  model = train.create_model(config, 10)
  learning_rate_fn = train.create_learning_rate_fn(config, 100)
  variables = models.init_variables(model, (32, 32, 3), jax.random.key(0))
  state = train.create_train_state(model, variables, train.create_optimizer(config, learning_rate_fn))
  step_fn, _ = train.jit_steps(config, train.create_mesh(), learning_rate_fn, mean, std, 10)
  state = jax.block_until_ready(step_fn(state, batch)[0])  # Compiles; the state is donated from here on.
  start = time.perf_counter()
  for _ in range(FLAGS.step_repeats):
    state = step_fn(state, batch)[0]
  jax.block_until_ready(state)
  step_seconds = (time.perf_counter() - start) / FLAGS.step_repeats
  return augment_seconds, step_seconds


def describe(values, unit_format) -> str:
  return f'median {unit_format(statistics.median(values))} (min {unit_format(min(values))}, max {unit_format(max(values))})'


def main(_):
  split = cifar_sized_split()
  device = f'{jax.devices()[0].device_kind} x{jax.device_count()}'
  timings = [augment_vs_step_seconds(split) for _ in range(FLAGS.repeats)]
  augment_ms = [1e3 * a for a, _ in timings]
  step_ms = [1e3 * s for _, s in timings]
  ratios = [a / s for a, s in timings]
  pin_to_one_core()
  rates = [tfdata_images_per_sec(split) for _ in range(FLAGS.repeats)]
  print(f'device: {device}; batch {FLAGS.batch_size}; {FLAGS.repeats} repeats')
  print(f'tfdata pipeline, 1 CPU core: {describe(rates, lambda v: f"{v:,.0f} images/s")}')
  print(f'augment (crop, flip, cutout) of one batch: {describe(augment_ms, lambda v: f"{v:.2f} ms")}')
  print(f'resnet18 train step, same batch:          {describe(step_ms, lambda v: f"{v:.1f} ms")}')
  print(f'augmentation / train step: {describe(ratios, lambda v: f"{v:.2%}")}')


if __name__ == '__main__':
  app.run(main)
