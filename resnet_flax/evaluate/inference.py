"""The forward pass of evaluation: the test split as the model saw its data, one jitted forward over the
('data',) mesh on every example once (padded, masked batches), with test-time augmentation views."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_flax import data, models
from resnet_flax.data import DataError, ImageData, augment, input_pipeline
from resnet_flax.models.trained import Restored
from resnet_flax.run.workdir import RunInfo

PROGRESS_EVERY_S = 5.0  # An evaluation logs its progress this often, so short ones stay quiet.


def load_test_split(data_config: ml_collections.ConfigDict, info: RunInfo) -> ImageData:
  """The test split, its images resized as the run's were (`resized_as_trained`)."""
  split = data.load_test_split(resized_as_trained(data_config, info))
  check_image_shape(split.images.shape[1:], info.image_shape, f'the test split of data.source={data_config.source}')
  return split


def resized_as_trained(data_config: ml_collections.ConfigDict, info: RunInfo) -> ml_collections.ConfigDict:
  """`data_config` with the run's image size and resize policy: any image becomes what the model saw."""
  height, width, _ = info.image_shape
  resized = ml_collections.ConfigDict(data_config.to_dict())
  resized.image_size, resized.resize = (height if height == width else 0), info.resize
  return resized


def check_image_shape(shape: Sequence[int], model_shape: Sequence[int], what: str):
  if tuple(shape) != tuple(model_shape):
    raise DataError(
      f'{what}: {"x".join(map(str, shape))} (HxWxC) images, but the model was trained on '
      f'{"x".join(map(str, model_shape))}, which are not square: resize them to that size beforehand'
    )


def forward_views(
  variables, images: jax.Array, *, model: nn.Module, mean, std, views: tuple[tuple[bool, int], ...]
) -> dict[str, jax.Array]:
  """Logits of the plain images and, with several views, the mean softmax over the views."""
  logits = [models.apply_to_pixels(model.apply, variables, augment.view(images, *v), mean, std) for v in views]
  outputs = {'logits': logits[0]}
  if len(views) > 1:
    outputs['tta_probabilities'] = jnp.mean(jnp.stack([jax.nn.softmax(l) for l in logits]), axis=0)
  return outputs


def compile_forward(restored: Restored, tta: str, mesh: Mesh) -> Callable:
  """`forward_views` of `restored` with the views of `tta`, jitted over `mesh`: (variables, images) -> outputs."""
  return jax.jit(
    lambda variables, images: forward_views(
      variables,
      images,
      model=restored.model,
      mean=restored.run.info.pixel_mean,
      std=restored.run.info.pixel_std,
      views=augment.TTA_VIEWS[tta],
    ),
    in_shardings=(NamedSharding(mesh, P()), input_pipeline.data_sharding(mesh)),
    out_shardings=NamedSharding(mesh, P()),
  )


def forward(
  restored: Restored, split: ImageData, batch_size: int, tta: str, mesh: Mesh, forward_fn: Callable | None = None
) -> dict[str, np.ndarray]:
  """Per-example outputs of `forward_views` for every example of `split` once, in order, on the host.

  `forward_fn` (of `compile_forward`) saves compiling again when called repeatedly (the Python API).
  """
  forward_fn = forward_fn or compile_forward(restored, tta, mesh)
  collected = []
  for images, _, real in with_progress(
    sharded_batches(split, batch_size, mesh), -(-len(split) // batch_size), 'evaluation'
  ):
    collected.append({k: v[real] for k, v in jax.device_get(forward_fn(restored.variables, images)).items()})
  return {k: np.concatenate([c[k] for c in collected]) for k in collected[0]}


def sharded_batches(split: ImageData, batch_size: int, mesh: Mesh) -> Iterator[tuple[jax.Array, jax.Array, np.ndarray]]:
  """(images, labels, real) of every example of `split` once, in padded batches sharded over `mesh`;
  `real` (on the host) is False for the padding."""
  sharding, local = input_pipeline.data_sharding(mesh), input_pipeline.process_slice(batch_size)
  for batch in input_pipeline.padded_batches(split, batch_size):
    images, labels = (jax.make_array_from_process_local_data(sharding, batch[k][local]) for k in ('image', 'label'))
    yield images, labels, batch['mask'] > 0


def with_progress(items: Iterator, total: int, what: str) -> Iterator:
  """Yields `items`, logging a progress bar with ETA every PROGRESS_EVERY_S seconds."""
  start = last = time.perf_counter()
  for done, item in enumerate(items, 1):
    yield item
    now = time.perf_counter()
    if now - last >= PROGRESS_EVERY_S and done < total:
      bar = '#' * (20 * done // total)
      eta = (now - start) / done * (total - done)
      logging.info(
        '%s [%-20s] %d/%d batches (%.0f%%), ETA %s',
        what,
        bar,
        done,
        total,
        100 * done / total,
        time.strftime('%H:%M:%S', time.gmtime(eta)),
      )
      last = now
