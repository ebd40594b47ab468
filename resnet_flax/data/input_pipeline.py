"""Step-indexed input pipelines that hand uint8 batches, sharded over the mesh, to the train step.

Both pipelines produce the same batches: global batch `step` holds the examples
`order[pos * B:(pos + 1) * B]` (their indices in the training split are its `index`), with
`epoch = epoch_of(step, steps_per_epoch)`, `pos = step % steps_per_epoch` and
`order = epoch_order(seed, epoch, n, strata)`.
A run resumed at step k therefore continues exactly where an uninterrupted run would be,
replaying nothing. The last partial batch of each epoch is dropped (a different one each
epoch). Augmentation happens in the train step.

`data.sampling` chooses the order: `shuffle` is a permutation of the n training examples;
`balanced` draws n examples with replacement, each class equally likely (example i with
probability 1 / (K n_c), K the classes present, n_c the examples of its class): a class first,
then an example of it, both as integers, so the host and the devices draw the same examples.

The batches of consecutive steps come stacked, one stack per call of the train step (which
scans over them): `train_batches` takes the length of each call, and a call stays within
one epoch (`call_lengths` plans them so).

- `tfdata`: host tf.data gathers each process's slice of the batch from in-memory arrays,
  prefetches, and the next batch is already on its way to the devices while a step runs.
- `device`: the whole split lives in device memory; the permutation and the gather run in jit.
"""

from __future__ import annotations

import abc
import collections
import functools
import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_flax.data.dataset import ImageData
from resnet_flax.run.workdir import epoch_of, steps_per_epoch

Batch = dict[str, jax.Array]


SAMPLINGS = ('shuffle', 'balanced')


class ClassStrata(NamedTuple):
  """The training examples grouped by class, for balanced sampling: the classes present only."""

  by_class: np.ndarray  # int32 [n]: example indices sorted by label (stable).
  starts: np.ndarray  # int32 [K]: where each class begins in `by_class`.
  counts: np.ndarray  # int32 [K]: its number of examples (all > 0).


def class_strata(labels: np.ndarray) -> ClassStrata:
  counts = np.bincount(labels)
  present = np.flatnonzero(counts)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  by_class = np.argsort(labels, kind='stable').astype(np.int32)
  return ClassStrata(by_class, starts[present].astype(np.int32), counts[present].astype(np.int32))


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> jax.Array:
  """The example order of `epoch`: a pure function of (seed, epoch)."""
  key = jax.random.fold_in(jax.random.key(seed), epoch)
  return jax.random.permutation(key, num_examples).astype(jnp.int32)


def epoch_order(seed: int, epoch: int, num_examples: int, strata: ClassStrata | None = None) -> jax.Array:
  """The examples of `epoch`, a pure function of (seed, epoch): `epoch_permutation` without `strata`,
  else `num_examples` draws with replacement, classes uniformly likely.

  Integer draws only (a class, then an offset within it): no float cumulative sum whose rounding
  could differ between the host and an accelerator.
  """
  if strata is None:
    return epoch_permutation(seed, epoch, num_examples)
  class_key, offset_key = jax.random.split(jax.random.fold_in(jax.random.key(seed), epoch))
  by_class, starts, counts = (jnp.asarray(a) for a in strata)
  classes = jax.random.randint(class_key, (num_examples,), 0, len(counts))
  offsets = jax.random.randint(offset_key, (num_examples,), 0, counts[classes])
  return by_class[starts[classes] + offsets]


def _host_order(seed: int, epoch: int, num_examples: int, strata: ClassStrata | None) -> np.ndarray:
  with jax.default_device(jax.local_devices(backend='cpu')[0]):
    return np.asarray(epoch_order(seed, epoch, num_examples, strata))


def data_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def stacked_data_sharding(mesh: Mesh) -> NamedSharding:
  """Stacked batches [steps, batch, ...]: each step's batch sharded as `data_sharding` shards it."""
  return NamedSharding(mesh, P(None, 'data'))


def call_lengths(start_step: int, stop_step: int, max_length: int, ends_every: Sequence[int]) -> list[int]:
  """How many steps each call of the train step runs, to go from `start_step` to `stop_step`.

  A call runs at most `max_length` steps and ends at every multiple of each of `ends_every` (where
  the loop logs, evaluates or saves, and where an epoch ends), so the host acts at the same steps
  whatever `max_length` is.
  """
  lengths, step = [], start_step
  while step < stop_step:
    end = min([stop_step, step + max_length] + [(step // every + 1) * every for every in ends_every])
    lengths.append(end - step)
    step = end
  return lengths


def process_slice(global_batch: int) -> slice:
  """The part of each global batch that this process feeds."""
  local = global_batch // jax.process_count()
  return slice(jax.process_index() * local, (jax.process_index() + 1) * local)


def prefetch(batches: Iterator[Batch], size: int = 2) -> Iterator[Batch]:
  """Keeps `size` batches in flight, so the transfer of the next overlaps the current step."""
  queue = collections.deque()
  for batch in batches:
    queue.append(batch)
    if len(queue) == size:
      yield queue.popleft()
  yield from queue


class InputPipeline(abc.ABC):
  """Train batches indexed by step, and padded, masked evaluation batches."""

  def __init__(self, train: ImageData, batch_size: int, seed: int, mesh: Mesh, sampling: str = 'shuffle'):
    self.train = train
    self.batch_size = batch_size
    self.seed = seed
    self.mesh = mesh
    self.strata = class_strata(train.labels) if sampling == 'balanced' else None
    self.steps_per_epoch = steps_per_epoch(len(train), batch_size)
    self._eval_cache: dict[int, list[Batch]] = {}

  @abc.abstractmethod
  def train_batches(self, start_step: int, lengths: Sequence[int]) -> Iterator[Batch]:
    """From step `start_step` on, for each n of `lengths`, the global batches of the next n steps,
    stacked: {'image': [n, B, H, W, C] uint8, 'label': [n, B], 'index': [n, B]}. No stack may cross
    the end of an epoch."""

  def eval_batches(self, split: ImageData, batch_size: int) -> list[Batch]:
    """Every example of `split` once; the last batch is padded and `mask` marks real examples.

    The batches are built once and kept on the devices for later evaluations.
    """
    key = id(split)
    if key not in self._eval_cache:
      self._eval_cache[key] = [self._to_global(batch) for batch in padded_batches(split, batch_size)]
    return self._eval_cache[key]

  def _to_global(self, global_batch: dict[str, np.ndarray]) -> Batch:
    local = process_slice(len(global_batch['label']))
    sharding = data_sharding(self.mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v[local]) for k, v in global_batch.items()}


def padded_batches(split: ImageData, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Fixed-order batches of `split`, the last one zero-padded, with a 0/1 `mask`."""
  for start in range(0, len(split), batch_size):
    images = split.images[start : start + batch_size]
    labels = split.labels[start : start + batch_size]
    pad = batch_size - len(labels)
    yield {
      'image': np.pad(images, ((0, pad), (0, 0), (0, 0), (0, 0))),
      'label': np.pad(labels, (0, pad)),
      'mask': np.pad(np.ones(len(labels), np.float32), (0, pad)),
    }


class TfDataPipeline(InputPipeline):
  """Host pipeline: tf.data gathers this process's slice of every batch from host memory."""

  def train_batches(self, start_step: int, lengths: Sequence[int]) -> Iterator[Batch]:
    local_batches = self._local_dataset(start_step, start_step + sum(lengths)).as_numpy_iterator()
    stacks = (_stack(itertools.islice(local_batches, n)) for n in lengths)
    return prefetch(self._to_global_train(stack) for stack in stacks)

  def _to_global_train(self, local_stack: dict[str, np.ndarray]) -> Batch:
    sharding = stacked_data_sharding(self.mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_stack.items()}

  def local_indices(self, epoch: int) -> np.ndarray:
    """[steps_per_epoch, local batch] indices of this process's examples in `epoch`."""
    order = _host_order(self.seed, int(epoch), len(self.train), self.strata)
    steps = order[: self.steps_per_epoch * self.batch_size].reshape(self.steps_per_epoch, self.batch_size)
    return steps[:, process_slice(self.batch_size)]

  def _local_dataset(self, start_step: int, stop_step: int):
    import tensorflow as tf  # Only this pipeline needs TensorFlow.

    tf.config.set_visible_devices([], 'GPU')  # Keep TensorFlow off the accelerators.
    first_epoch, skip = epoch_of(start_step, self.steps_per_epoch), start_step % self.steps_per_epoch
    last_epoch = epoch_of(stop_step - 1, self.steps_per_epoch) + 1  # The range's end: after the last step's epoch.

    def epoch_indices(epoch):
      indices = tf.numpy_function(self.local_indices, [epoch], tf.int32, stateful=False)
      return tf.data.Dataset.from_tensor_slices(tf.ensure_shape(indices, [None, None]))

    def gather(indices):
      # From the host arrays, which may be a memory-mapped cache: never a second copy of the split in memory.
      images, labels = tf.numpy_function(
        lambda i: (self.train.images[i], self.train.labels[i]), [indices], (tf.uint8, tf.int32), stateful=False
      )
      return {'image': tf.ensure_shape(images, [None, *self.train.images.shape[1:]]), 'label': labels, 'index': indices}

    return (
      tf.data.Dataset.range(first_epoch, last_epoch)
      .flat_map(epoch_indices)
      .skip(skip)
      .take(stop_step - start_step)
      .map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
      .prefetch(tf.data.AUTOTUNE)
    )


class DevicePipeline(InputPipeline):
  """Device-resident pipeline: uint8 data in device memory, the epoch's order and the gather in jit."""

  def __init__(self, train: ImageData, batch_size: int, seed: int, mesh: Mesh, sampling: str = 'shuffle'):
    super().__init__(train, batch_size, seed, mesh, sampling)
    replicated = NamedSharding(mesh, P())
    self._images = jax.device_put(train.images, replicated)
    self._labels = jax.device_put(train.labels, replicated)
    self._strata = jax.device_put(self.strata, replicated)
    self._order = jax.jit(epoch_order, static_argnums=(2,), out_shardings=replicated)
    self._gather = jax.jit(
      functools.partial(_gather_batches, batch_size=batch_size),
      static_argnums=4,
      out_shardings=stacked_data_sharding(mesh),
    )

  def train_batches(self, start_step: int, lengths: Sequence[int]) -> Iterator[Batch]:
    order, order_epoch, step = None, None, start_step
    for n in lengths:
      epoch, position = epoch_of(step, self.steps_per_epoch), step % self.steps_per_epoch
      if position + n > self.steps_per_epoch:
        raise ValueError(f'steps {step}..{step + n - 1} cross the end of epoch {epoch}: plan with call_lengths')
      if epoch != order_epoch:
        seed_and_epoch = jax.device_put((self.seed, epoch))  # Explicit: no hidden transfer per call.
        order, order_epoch = self._order(*seed_and_epoch, len(self.train), self._strata), epoch
      yield self._gather(self._images, self._labels, order, jax.device_put(position), n)
      step += n


def _gather_batches(images, labels, order, position, num_steps, *, batch_size):
  """The batches of `num_steps` steps from `position` in the epoch of `order`, stacked."""
  indices = jax.lax.dynamic_slice_in_dim(order, position * batch_size, num_steps * batch_size)
  indices = indices.reshape(num_steps, batch_size)
  return {'image': images[indices], 'label': labels[indices], 'index': indices}


def _stack(batches: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  batches = list(batches)
  return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


PIPELINES = {'tfdata': TfDataPipeline, 'device': DevicePipeline}


def create_pipeline(
  name: str, train: ImageData, batch_size: int, seed: int, mesh: Mesh, sampling: str = 'shuffle'
) -> InputPipeline:
  """The pipeline `name` (`PIPELINES`), drawing each epoch's examples as `sampling` (`SAMPLINGS`) says."""
  return PIPELINES[name](train, batch_size, seed, mesh, sampling)
