"""Step-indexed input pipelines that hand uint8 batches, sharded over the mesh, to the train step.

Both pipelines produce the same batches: global batch `step` holds the examples
`perm[pos * B:(pos + 1) * B]` (their indices in the training split are its `index`), with
`epoch, pos = divmod(step, steps_per_epoch)` and `perm = epoch_permutation(seed, epoch, n)`. A run resumed at step k therefore continues
exactly where an uninterrupted run would be, replaying nothing. The last partial batch of
each epoch is dropped (a different one each epoch). Augmentation happens in the train step.

- `tfdata`: host tf.data gathers each process's slice of the batch from in-memory arrays,
  prefetches, and the next batch is already on its way to the devices while a step runs.
- `device`: the whole split lives in device memory; the permutation and the gather run in jit.
"""

from __future__ import annotations

import abc
import collections
import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from resnet_flax.data import ImageData

Batch = dict[str, jax.Array]


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> jax.Array:
  """The example order of `epoch`: a pure function of (seed, epoch)."""
  key = jax.random.fold_in(jax.random.key(seed), epoch)
  return jax.random.permutation(key, num_examples).astype(jnp.int32)


def _host_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  with jax.default_device(jax.local_devices(backend='cpu')[0]):
    return np.asarray(epoch_permutation(seed, epoch, num_examples))


def data_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


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

  def __init__(self, train: ImageData, batch_size: int, seed: int, mesh: Mesh):
    self.train = train
    self.batch_size = batch_size
    self.seed = seed
    self.mesh = mesh
    self.steps_per_epoch = len(train) // batch_size
    self._eval_cache: dict[int, list[Batch]] = {}

  @abc.abstractmethod
  def train_batches(self, start_step: int, num_steps: int) -> Iterator[Batch]:
    """Global batches for steps start_step, ..., num_steps - 1."""

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
    images = split.images[start:start + batch_size]
    labels = split.labels[start:start + batch_size]
    pad = batch_size - len(labels)
    yield {
        'image': np.pad(images, ((0, pad), (0, 0), (0, 0), (0, 0))),
        'label': np.pad(labels, (0, pad)),
        'mask': np.pad(np.ones(len(labels), np.float32), (0, pad)),
    }


class TfDataPipeline(InputPipeline):
  """Host pipeline: tf.data gathers this process's slice of every batch from host memory."""

  def train_batches(self, start_step: int, num_steps: int) -> Iterator[Batch]:
    dataset = self._local_dataset(start_step, num_steps)
    return prefetch(self._to_global_train(b) for b in dataset.as_numpy_iterator())

  def _to_global_train(self, local_batch: dict[str, np.ndarray]) -> Batch:
    sharding = data_sharding(self.mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}

  def local_indices(self, epoch: int) -> np.ndarray:
    """[steps_per_epoch, local batch] indices of this process's examples in `epoch`."""
    perm = _host_permutation(self.seed, int(epoch), len(self.train))
    steps = perm[:self.steps_per_epoch * self.batch_size].reshape(self.steps_per_epoch, self.batch_size)
    return steps[:, process_slice(self.batch_size)]

  def _local_dataset(self, start_step: int, num_steps: int):
    import tensorflow as tf  # Only this pipeline needs TensorFlow.

    tf.config.set_visible_devices([], 'GPU')  # Keep TensorFlow off the accelerators.
    images, labels = tf.constant(self.train.images), tf.constant(self.train.labels)
    first_epoch, skip = divmod(start_step, self.steps_per_epoch)
    last_epoch = -(-num_steps // self.steps_per_epoch)

    def epoch_indices(epoch):
      indices = tf.numpy_function(self.local_indices, [epoch], tf.int32, stateful=False)
      return tf.data.Dataset.from_tensor_slices(tf.ensure_shape(indices, [None, None]))

    def gather(indices):
      return {'image': tf.gather(images, indices), 'label': tf.gather(labels, indices), 'index': indices}

    return (tf.data.Dataset.range(first_epoch, last_epoch)
            .flat_map(epoch_indices)
            .skip(skip)
            .take(num_steps - start_step)
            .map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .prefetch(tf.data.AUTOTUNE))


class DevicePipeline(InputPipeline):
  """Device-resident pipeline: uint8 data in device memory, permutation and gather in jit."""

  def __init__(self, train: ImageData, batch_size: int, seed: int, mesh: Mesh):
    super().__init__(train, batch_size, seed, mesh)
    replicated = NamedSharding(mesh, P())
    self._images = jax.device_put(train.images, replicated)
    self._labels = jax.device_put(train.labels, replicated)
    self._permutation = jax.jit(epoch_permutation, static_argnums=(2,), out_shardings=replicated)
    self._gather = jax.jit(functools.partial(_gather_batch, batch_size=batch_size),
                           out_shardings=data_sharding(mesh))

  def train_batches(self, start_step: int, num_steps: int) -> Iterator[Batch]:
    perm, perm_epoch = None, None
    for step in range(start_step, num_steps):
      epoch, position = divmod(step, self.steps_per_epoch)
      if epoch != perm_epoch:
        perm, perm_epoch = self._permutation(self.seed, epoch, len(self.train)), epoch
      yield self._gather(self._images, self._labels, perm, position)


def _gather_batch(images, labels, perm, position, *, batch_size):
  indices = jax.lax.dynamic_slice_in_dim(perm, position * batch_size, batch_size)
  return {'image': images[indices], 'label': labels[indices], 'index': indices}


PIPELINES = {'tfdata': TfDataPipeline, 'device': DevicePipeline}


def create_pipeline(name: str, train: ImageData, batch_size: int, seed: int, mesh: Mesh) -> InputPipeline:
  return PIPELINES[name](train, batch_size, seed, mesh)
