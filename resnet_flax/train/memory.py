"""Before the first step: do the compiled train and eval steps fit in the memory the devices have free?

Hand-written because nothing compares the two figures: XLA knows what a compiled program needs
(`Compiled.memory_analysis()`: its arguments, outputs, temporaries and code, a donated argument counted once), and
`run/device_memory.py` tells what is free. XLA:CPU asks for a program's whole temporary buffer at once, so a step that
does not fit fails on its first call with a raw RESOURCE_EXHAUSTED (ResNet-18 with its CIFAR stem at 128 px and batch
512 asks for 29.6 GB), or the kernel's OOM killer ends the process without a word. So this check refuses in one
line before the first step, naming the largest batch that fits, as Lightning's batch-size finder does but without
running a step: the analysis at a second, smaller batch gives the bytes per example, and a straight line the batch
where they reach what is free (activations grow linearly with the batch).

Compiled once: jax keeps the executable that `lower(...).compile()` built, and the first call with the same shapes
and shardings runs it (JAX_LOG_COMPILES=1 shows one compilation of each step).

Counted, per device: the train step's arguments (the state, the stack of batches of the longest call), outputs,
temporaries and code, less the state, which is already allocated, as is everything set up before (the splits in
host memory, the device pipeline's copy of the training split): the free figure is read after them; one more
stack, prefetched while a step runs; the evaluation batches that the input pipeline keeps on the devices from the
first evaluation on; the eval step, likewise. Left out: tf.data's host buffers, Orbax's host copy of the state
while a checkpoint is written, the overfitting guard's attack and the allocators' fragmentation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from jax.sharding import Mesh

from resnet_flax import models
from resnet_flax.data import ImageData, input_pipeline
from resnet_flax.errors import OutOfMemoryError
from resnet_flax.run import device_memory

CIFAR_SIDE = 32  # Images no larger than CIFAR's: a smaller size or a downsampling stem is no fix worth naming.
PREFETCHED_STACKS = 1  # `input_pipeline.prefetch`: the next stack is on its way to the devices while a step runs.
XLA_OUT_OF_MEMORY = re.compile(r'RESOURCE_EXHAUSTED|Out of memory', re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class ProgramMemory:
  """Bytes one device needs to run a compiled program, from XLA's memory analysis."""

  arguments: int
  outputs: int
  aliased: int  # Donated arguments that become outputs: their bytes are counted once.
  temporaries: int
  code: int

  @classmethod
  def of(cls, compiled: jax.stages.Compiled) -> ProgramMemory:
    stats = compiled.memory_analysis()
    return cls(
      stats.argument_size_in_bytes,
      stats.output_size_in_bytes,
      stats.alias_size_in_bytes,
      stats.temp_size_in_bytes,
      stats.generated_code_size_in_bytes,
    )

  @property
  def peak(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.code


def gigabytes(num_bytes: float) -> str:
  """Bytes as GB (10^9, as XLA's and the kernel's messages count them), small figures as MB."""
  return f'{num_bytes / 1e9:.1f} GB' if num_bytes >= 1e9 else f'{num_bytes / 1e6:.0f} MB'


def tree_bytes(tree: Any) -> int:
  """Bytes of the arrays of `tree` on one device (the state is replicated: each device holds all of it)."""
  leaves = jax.tree.leaves(tree)
  return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize for leaf in leaves)


def stack_shapes(split: ImageData, batch_size: int, length: int, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The stack of `length` train batches the input pipelines hand the train step (`InputPipeline.train_batches`)."""
  sharding = input_pipeline.stacked_data_sharding(mesh)
  struct = lambda shape, dtype: jax.ShapeDtypeStruct((length, batch_size, *shape), dtype, sharding=sharding)
  return {
    'image': struct(split.images.shape[1:], jnp.uint8),
    'label': struct((), jnp.int32),
    'index': struct((), jnp.int32),
  }


def eval_batch_shapes(split: ImageData, batch_size: int, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """One evaluation batch (`input_pipeline.padded_batches`)."""
  sharding = input_pipeline.data_sharding(mesh)
  struct = lambda shape, dtype: jax.ShapeDtypeStruct((batch_size, *shape), dtype, sharding=sharding)
  return {
    'image': struct(split.images.shape[1:], jnp.uint8),
    'label': struct((), split.labels.dtype),
    'mask': struct((), jnp.float32),
  }


def eval_cache_bytes(split: ImageData, batch_size: int, num_devices: int) -> int:
  """Bytes per device of the padded evaluation batches the input pipeline keeps on the devices."""
  padded = math.ceil(len(split) / batch_size) * batch_size
  per_example = split.images[0].nbytes + split.labels.dtype.itemsize + 4  # The image, its label, its mask.
  return padded * per_example // num_devices


def largest_batch(need_at: Callable[[int], int], batch: int, free: int, multiple: int) -> int:
  """The largest multiple of `multiple` below `batch` whose need (`need_at`, bytes per device) fits in `free`, from a
  straight line through the need at `batch` and at a second batch near the answer; 0 where not even `multiple` fits.
  """
  if batch <= multiple:
    return 0
  need = need_at(batch)
  second = min(max(int(batch * free / need) // multiple * multiple, multiple), batch - multiple)
  per_example = max((need - need_at(second)) / (batch - second), 1.0)
  fitting = int(second + (free - need_at(second)) / per_example) // multiple * multiple
  return max(min(fitting, batch - multiple), 0)


def describe_model(config: ml_collections.ConfigDict) -> str:
  return f'{config.model.name} with its CIFAR stem' if models.full_resolution_stem(config) else config.model.name


def fixes(config: ml_collections.ConfigDict, batch_fix: str, image_side: int) -> str:
  """`batch_fix`, then the ImageNet stem and a smaller image size where the images are larger than CIFAR's (32 px),
  as one phrase."""
  options = [batch_fix] if batch_fix else []
  if image_side > CIFAR_SIDE and models.full_resolution_stem(config):
    options.append('--config.model.stem=imagenet (16x fewer pixels after it)')
  if image_side > CIFAR_SIDE:
    options.append('a smaller --config.data.image_size')
  return ', or '.join(options)


def refusal(
  config: ml_collections.ConfigDict, field: str, need: int, budget: device_memory.Budget, largest: int, image_shape
) -> str:
  """The one line that refuses a step needing `need` bytes per device, with the fixes."""
  step = 'train' if field == 'batch_size' else 'eval'
  needs = f'{gigabytes(need * budget.devices)} of host memory' if budget.shared else f'{gigabytes(need)} per device'
  batch_fix = f'--config.{field}={largest} (the largest that fits)' if largest else ''
  return (
    f'out of memory before the first step: the {step} step needs {needs} but {gigabytes(budget.free)} is free '
    f'({budget.source}), for {describe_model(config)} on {image_shape[0]}x{image_shape[1]} images at '
    f'--config.{field}={config[field]}{"" if largest else f" (not even {jax.device_count()} fits)"}; '
    f'fixes: {fixes(config, batch_fix, image_shape[0])} (--config.check_memory=False skips this check)'
  )


class StepNeeds:
  """The bytes per device that the train and eval steps need beyond what is already allocated, by batch size; each
  batch size's step compiled once (training then runs the configured one's executable)."""

  def __init__(self, setup: Any, train_fn: Any, eval_fn: Any, state: Any, length: int, eval_batch_size: int):
    """`setup` is a `trainer.Setup`, `train_fn` a `step.BoundTrainStep` on stacks of `length` batches, `eval_fn` the
    jitted eval step, `state` the train state they take, `eval_batch_size` that of the evaluation batches kept."""
    self.setup, self.train_fn, self.eval_fn, self.state, self.length = setup, train_fn, eval_fn, state, length
    self.resident, self.num_devices = tree_bytes(state), jax.device_count()
    self.eval_cache = eval_cache_bytes(setup.eval_split, eval_batch_size, self.num_devices)
    self.train, self.eval = functools.cache(self._train), functools.cache(self._eval)

  def _train(self, batch: int) -> int:
    stack = stack_shapes(self.setup.train_split, batch, self.length, self.setup.mesh)
    stack_bytes = sum(math.prod(s.shape) * s.dtype.itemsize for s in stack.values()) // self.num_devices
    program = ProgramMemory.of(self.train_fn.lower(self.state, stack).compile())
    return program.peak - self.resident + PREFETCHED_STACKS * stack_bytes + self.eval_cache

  def _eval(self, batch: int) -> int:
    shapes = eval_batch_shapes(self.setup.eval_split, batch, self.setup.mesh)
    program = ProgramMemory.of(self.eval_fn.lower(self.state, shapes).compile())
    return program.peak - self.resident + eval_cache_bytes(self.setup.eval_split, batch, self.num_devices)


def check_steps_fit(config: ml_collections.ConfigDict, needs: StepNeeds) -> None:
  """Raises OutOfMemoryError when the train step at `config.batch_size` or the eval step at `config.eval_batch_size`
  would not fit in the memory the devices have free, naming the largest batch that fits."""
  budget = device_memory.budget(needs.setup.mesh.local_devices)
  if budget is None:
    logging.info('Memory check skipped: the devices do not tell the memory they have free')
    return
  image_shape = needs.setup.train_split.images.shape[1:]
  for field, need_at in (('batch_size', needs.train), ('eval_batch_size', needs.eval)):
    if need_at(config[field]) > budget.per_device:
      largest = largest_batch(need_at, config[field], budget.per_device, needs.num_devices)
      raise OutOfMemoryError(refusal(config, field, need_at(config[field]), budget, largest, image_shape))
  logging.info(
    'Memory: the train step needs %s per device, the eval step %s; %s free (%s)',
    gigabytes(needs.train(config.batch_size)),
    gigabytes(needs.eval(config.eval_batch_size)),
    gigabytes(budget.free),
    budget.source,
  )


def out_of_memory_message(error: Exception, config: ml_collections.ConfigDict | None) -> str | None:
  """One line for XLA's out-of-memory `error` (RESOURCE_EXHAUSTED, at compile or at run time) with the fixes;
  None for any other error. `config` is the run's, where there is one."""
  text = str(error)
  if not XLA_OUT_OF_MEMORY.search(text):
    return None
  allocation = re.search(r'allocating (\d+) bytes', text)
  what = f'XLA could not allocate {gigabytes(int(allocation[1]))}' if allocation else 'XLA ran out of memory'
  if config is None:
    return f'out of memory: {what}; use a smaller batch size or a smaller image size'
  side = config.data.image_size
  images = f'{side}x{side} images' if side else "images of the data's own size"
  batch_fix = 'a smaller --config.batch_size or --config.eval_batch_size'
  return (
    f'out of memory: {what} for {describe_model(config)} on {images} at --config.batch_size={config.batch_size} '
    f'(--config.eval_batch_size={config.eval_batch_size}); fixes: {fixes(config, batch_fix, side)}'
  )
