"""Input pipeline throughput and the cost of on-device augmentation.

  python benchmarks/data_throughput.py [--batch_size=512] [--steps=300] [--repeats=5]

1. images/s of the host `tfdata` pipeline on ONE CPU core (the process is pinned to core 0 and
   TensorFlow to one thread), from in-memory CIFAR-sized uint8 arrays, delivered as global jax
   arrays: what the train step receives.
2. time of the jitted augmentation (crop, flip, cutout) of one batch vs one `--model` (resnet18)
   train step on the same device and batch.
Figures are medians over `--repeats`, with the min-max spread; they also go to
`<--output_dir>/data_throughput_<device>.json`.
"""

import os
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # Not this folder: see benchmarks/compression.py.

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks import common  # noqa: E402
from configs import default  # noqa: E402
from resnet_flax.data import (
  ImageData,  # noqa: E402
  augment,
  input_pipeline,  # noqa: E402
)
from resnet_flax.run import distributed

flags.DEFINE_string('model', 'resnet18', 'Model preset of the train step.')
flags.DEFINE_integer('batch_size', 512, 'Global batch size.')
flags.DEFINE_integer('steps', 300, 'Batches per pipeline measurement.')
flags.DEFINE_integer('repeats', 5, 'Measurements of each kind.')
flags.DEFINE_integer('step_repeats', 3, 'Timed train steps per measurement (slow on CPU).')
flags.DEFINE_integer('dataset_size', 50_000, 'Images in the in-memory dataset.')
FLAGS = flags.FLAGS

AUGMENT_CALLS = 20  # Augmentations per measurement.
PIPELINE_WARMUP = 10  # Batches before the pipeline timing: the graph, the first permutation, the prefetch buffer.
TINY = {'model': 'resnet_tiny', 'batch_size': 8, 'steps': 2, 'repeats': 1, 'step_repeats': 1, 'dataset_size': 64}


def pin_to_one_core():
  os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  import tensorflow as tf

  tf.config.threading.set_inter_op_parallelism_threads(1)
  tf.config.threading.set_intra_op_parallelism_threads(1)


def tfdata_images_per_sec(split: ImageData) -> float:
  pipeline = input_pipeline.create_pipeline('tfdata', split, FLAGS.batch_size, 0, distributed.create_mesh())
  batches = pipeline.train_batches(0, [1] * (FLAGS.steps + PIPELINE_WARMUP))
  for _ in range(PIPELINE_WARMUP):
    jax.block_until_ready(next(batches))
  start = time.perf_counter()
  for batch in batches:
    jax.block_until_ready(batch)
  return FLAGS.steps * FLAGS.batch_size / (time.perf_counter() - start)


def augment_and_step_seconds(split: ImageData) -> tuple[list[float], list[float]]:
  """Seconds of one augmentation of a batch, and of one train step on it, per repeat."""
  config = default.get_config()
  config.model.name = FLAGS.model
  config.augment.train_ops = ('crop', 'flip', 'cutout')
  config.batch_size = FLAGS.batch_size
  jax_trainer = common.create_jax_trainer(config, split)
  batch = jax_trainer.device_batch(split)
  context = {'indices': batch['index'][0], 'epoch': 0, 'seed': config.seed}
  augment_fn = jax.jit(
    lambda images, key: augment.augment_batch(
      images, key, config.augment, jax_trainer.pixel_mean, jax_trainer.pixel_std, **context
    )
  )
  images = batch['image'][0]
  augment_calls = lambda n: jax.block_until_ready([augment_fn(images, jax.random.key(0)) for _ in range(n)])
  augment_calls(1)  # Compiles.
  augment_seconds = common.time_calls(lambda: augment_calls(AUGMENT_CALLS), FLAGS.repeats)
  jax_trainer.run_on(batch, 1)  # Compiles; the state is donated from here on.
  step_seconds = common.time_calls(lambda: jax_trainer.run_on(batch, FLAGS.step_repeats), FLAGS.repeats)
  return [s / AUGMENT_CALLS for s in augment_seconds], [s / FLAGS.step_repeats for s in step_seconds]


def main(_):
  common.apply_tiny(TINY)
  split = common.random_split(FLAGS.dataset_size)
  device = common.jax_device()
  augment_seconds, step_seconds = augment_and_step_seconds(split)
  augment_ms = [1e3 * a for a in augment_seconds]
  step_ms = [1e3 * s for s in step_seconds]
  ratios = [a / s for a, s in zip(augment_seconds, step_seconds, strict=True)]
  pin_to_one_core()
  rates = [tfdata_images_per_sec(split) for _ in range(FLAGS.repeats)]
  print(f'device: {device}; batch {FLAGS.batch_size}; {FLAGS.repeats} repeats')
  print(f'tfdata pipeline, 1 CPU core: {common.images_per_sec(rates)}')
  print(f'augment (crop, flip, cutout) of one batch: {common.describe(augment_ms, lambda v: f"{v:.2f} ms")}')
  print(f'{FLAGS.model} train step, same batch: {common.describe(step_ms, lambda v: f"{v:.1f} ms")}')
  print(f'augmentation / train step: {common.describe(ratios, lambda v: f"{v:.2%}")}')
  settings = {
    'model': FLAGS.model,
    'batch_size': FLAGS.batch_size,
    'steps': FLAGS.steps,
    'repeats': FLAGS.repeats,
    'step_repeats': FLAGS.step_repeats,
    'dataset_size': FLAGS.dataset_size,
  }
  common.write_results(
    'data_throughput',
    device,
    settings,
    {
      'tfdata_images_per_sec_one_core': common.summarize(rates),
      'augment_ms': common.summarize(augment_ms),
      'step_ms': common.summarize(step_ms),
      'augment_over_step': common.summarize(ratios),
    },
  )


if __name__ == '__main__':
  app.run(main)
