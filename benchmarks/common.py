"""What the benchmark scripts share: flags, timing, summaries, the JAX train step, and JSON results.

Every script prints its figures and writes them, with the device, the library versions and the
command, to `<--output_dir>/<benchmark>_<device>[_tiny].json`. `--tiny` runs one tiny iteration on a
CPU in seconds, to check that a script works; its figures mean nothing. `--deadline` (Unix time) makes a
script skip what it estimates would end past it, and say so in its JSON: benchmarks/gpu_suite.sh gives
each of its parts one, so that the whole suite fits a GPU lease.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import importlib.metadata
import itertools
import json
import math
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_flax import models
from resnet_flax.data import ImageData, augment, input_pipeline
from resnet_flax.run import distributed
from resnet_flax.run.workdir import Steps, epoch_of
from resnet_flax.train import hyperparams, step, trainer

RESULTS_DIR = Path(__file__).resolve().parent / 'results'
PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'numpy', 'torch')

flags.DEFINE_bool('tiny', False, 'One tiny iteration on a CPU in seconds, to check the script; meaningless figures.')
flags.DEFINE_string('output_dir', str(RESULTS_DIR), 'Where the JSON results go.')
flags.DEFINE_float(
  'deadline', None, 'Unix time by which to be done: what would end past it is skipped, and the JSON says so.'
)
FLAGS = flags.FLAGS


def apply_tiny(overrides: dict[str, Any]):
  """With --tiny, sets these flags (name: value), whatever the command line says."""
  if FLAGS.tiny:
    for name, value in overrides.items():
      FLAGS[name].value = value


# Time budget.


def seconds_left() -> float:
  """Seconds until --deadline; infinite without one."""
  return math.inf if FLAGS.deadline is None else FLAGS.deadline - time.time()


def over_budget(what: str, estimate_s: float) -> str | None:
  """Why `what`, estimated to take `estimate_s`, must be skipped to end by --deadline; None where it fits."""
  left = seconds_left()
  if estimate_s <= left:
    return None
  return f'{what} skipped: estimated {estimate_s:.0f} s, {max(left, 0):.0f} s left before the deadline'


# Figures.


def summarize(values: Sequence[float]) -> dict[str, Any]:
  return {'median': statistics.median(values), 'min': min(values), 'max': max(values), 'values': list(values)}


def describe(values: Sequence[float], unit_format: Callable[[float], str]) -> str:
  return (
    f'median {unit_format(statistics.median(values))} '
    f'(min {unit_format(min(values))}, max {unit_format(max(values))}, n={len(values)})'
  )


def images_per_sec(values: Sequence[float]) -> str:
  return describe(values, lambda v: f'{v:,.0f} images/s')


def gibibytes(num_bytes: int | None) -> str:
  return 'n/a' if num_bytes is None else f'{num_bytes / 2**30:.2f} GiB'


def time_calls(fn: Callable[[], Any], repeats: int) -> list[float]:
  """Seconds of each of `repeats` calls of `fn`, which must return only once the device is done."""
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    seconds.append(time.perf_counter() - start)
  return seconds


# Data and the JAX train step.


def random_split(num_images: int, num_classes: int = 10, image_shape: Sequence[int] = (32, 32, 3)) -> ImageData:
  """CIFAR-sized uint8 noise with random labels: costs what real images cost to move and train on."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (num_images, *image_shape), dtype=np.uint8)
  labels = rng.integers(0, num_classes, num_images).astype(np.int32)
  return ImageData(images, labels, tuple(map(str, range(num_classes))))


@dataclasses.dataclass
class JaxTrainer:
  """The train step as `trainer.train_and_evaluate` builds it (jitted over the ('data',) mesh, the
  replicated state donated), with its state; `run` steps through batches and waits for the device."""

  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  train_fn: Callable
  state: step.TrainState
  pixel_mean: tuple[float, ...]
  pixel_std: tuple[float, ...]
  step: int = 0  # Steps run, counted on the host.

  def run(self, batches: Iterable[input_pipeline.Batch]):
    """Steps through stacked batches, a call each, and waits for the device."""
    for batch in batches:
      self.state, _ = self.train_fn(self.state, batch)
      self.step += len(batch['label'])
    jax.block_until_ready(self.state)

  def run_on(self, batch: input_pipeline.Batch, num_steps: int):
    """`num_steps` steps on the same device-resident batch, one call each."""
    self.run(itertools.repeat(batch, num_steps))

  def run_epoch(self, pipeline: input_pipeline.InputPipeline, steps_per_call: int):
    """From the current step to the end of its epoch, in calls of the pipeline's batches as the training
    loop plans them (`steps_per_call` steps at most, never across an epoch's end)."""
    per_epoch = pipeline.steps_per_epoch
    stop = (epoch_of(self.step, per_epoch) + 1) * per_epoch
    self.run(
      pipeline.train_batches(self.step, input_pipeline.call_lengths(self.step, stop, steps_per_call, (per_epoch,)))
    )

  def pipeline(self, split: ImageData) -> input_pipeline.InputPipeline:
    """The config's training pipeline (`data.pipeline`) over `split`."""
    config = self.config
    return input_pipeline.create_pipeline(config.data.pipeline, split, config.batch_size, config.seed, self.mesh)

  def device_batch(self, split: ImageData) -> input_pipeline.Batch:
    """The first `batch_size` examples of `split`, as the pipelines hand one step's batch to the train step."""
    sharding = input_pipeline.stacked_data_sharding(self.mesh)
    size = self.config.batch_size
    return {
      'image': jax.device_put(split.images[None, :size], sharding),
      'label': jax.device_put(split.labels[None, :size], sharding),
      'index': jax.device_put(np.arange(size, dtype=np.int32)[None], sharding),
    }


def create_jax_trainer(config: ml_collections.ConfigDict, split: ImageData) -> JaxTrainer:
  """The same calls, in the same order, as `trainer.train_and_evaluate`."""
  num_classes = len(split.class_names)
  steps = Steps.of(config, len(split))
  model = models.create_model_from_config(config, num_classes)
  mean, std = augment.channel_stats(split.images)
  variables = trainer.initial_variables(config, model, split, mean, std)
  spec = step.create_spec(config, model, steps, mean, std, num_classes)
  hparams = hyperparams.of(config)
  mesh = distributed.create_mesh()
  state = step.create_train_state(variables, spec.optimizer(hparams), ema=config.ema_decay > 0)
  state = jax.device_put(state, NamedSharding(mesh, P()))
  train_fn, _ = step.jit_steps(spec, mesh, hparams)
  return JaxTrainer(config, mesh, train_fn, state, mean, std)


# Configs.


def load_config(name: str) -> ml_collections.ConfigDict:
  """get_config() of configs/<name>.py."""
  return importlib.import_module(f'configs.{name}').get_config()


def tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config's recipe for 4 steps of resnet_tiny on 64 synthetic images, in float32 (a CPU's)."""
  config.model.name = 'resnet_tiny'
  config.half_precision = False
  config.data.source = 'synthetic'
  config.data.synthetic_train_size = 64
  config.data.synthetic_test_size = 20
  config.batch_size = config.eval_batch_size = 16
  config.num_epochs = config.eval_every_epochs = 1.0
  config.log_every_steps = 2
  return config


def jax_device() -> str:
  return f'{jax.devices()[0].device_kind} x{jax.device_count()}'


def jax_peak_bytes() -> int | None:
  """Peak bytes the allocator of the first local device has handed out; None where it does not say (CPU)."""
  stats = jax.local_devices()[0].memory_stats()
  return stats.get('peak_bytes_in_use') if stats else None


# Results.


def environment(device: str) -> dict[str, Any]:
  """The machine, the library versions and the command, for the JSON results."""
  versions = {}
  for package in PACKAGES:
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      versions[package] = None
  return {
    'device': device,
    'command': f'python {shlex.join(sys.argv)}',
    'versions': {'python': platform.python_version(), **versions},
    'time': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
  }


def write_results(
  benchmark: str, device: str, settings: dict[str, Any], results: dict[str, Any], variant: str = ''
) -> Path:
  """Writes the JSON record of one run (`variant`: what sets it apart from the default run); returns its path."""
  slug = re.sub(r'[^a-z0-9]+', '_', f'{device} {variant}'.lower()).strip('_')
  path = Path(FLAGS.output_dir) / f'{benchmark}_{slug}{"_tiny" if FLAGS.tiny else ""}.json'
  path.parent.mkdir(parents=True, exist_ok=True)
  record = {'benchmark': benchmark, 'tiny': FLAGS.tiny, **environment(device), 'settings': settings, 'results': results}
  path.write_text(json.dumps(record, indent=2) + '\n')
  print(f'results: {path}')
  return path
