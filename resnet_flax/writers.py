"""Metric writers: clu's TensorBoard writer, or a TensorFlow-free one where TensorFlow is absent.

`clu.metric_writers` imports TensorFlow, which the GPU machines do not have. There the
`EventFileWriter` of the `tensorboard` package writes the same event files by itself.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging


class EventFileMetricWriter:
  """The part of clu's MetricWriter interface the trainer uses, on tensorboard alone."""

  def __init__(self, logdir: str):
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    self._writer = EventFileWriter(logdir)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    from tensorboard.compat.proto import event_pb2, summary_pb2

    values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
    self._writer.add_event(event_pb2.Event(step=step, summary=summary_pb2.Summary(value=values)))
    _log_scalars(step, scalars)

  def write_hparams(self, hparams: Mapping[str, Any]):
    from tensorboard.compat.proto import event_pb2
    from tensorboard.plugins.hparams import summary_v2

    self._writer.add_event(event_pb2.Event(summary=summary_v2.hparams_pb(dict(hparams))))

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


def _log_scalars(step: int, scalars: Mapping[str, Any]):
  logging.info('[%d] %s', step, ', '.join(f'{k}={float(v):.6g}' for k, v in scalars.items()))


def create_writer(logdir: str, is_primary: bool):
  """clu's default writer (TensorBoard + log) on the primary process, logging only elsewhere."""
  try:
    from clu import metric_writers
  except ImportError:
    logging.warning('TensorFlow is not importable: writing TensorBoard events without it.')
    return EventFileMetricWriter(logdir) if is_primary else _LoggingOnly()
  return metric_writers.create_default_writer(logdir, just_logging=not is_primary, asynchronous=True)


class _LoggingOnly:
  """Non-primary processes log but write no files."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    _log_scalars(step, scalars)

  def write_hparams(self, hparams: Mapping[str, Any]):
    logging.info('hparams: %s', json.dumps(dict(hparams), default=str))

  def flush(self):
    pass

  def close(self):
    pass


def flatten_hparams(config) -> dict[str, Any]:
  """Config as {'a.b': value} with values TensorBoard's hparams plugin accepts."""
  flat = {}

  def visit(prefix, node):
    for key, value in node.items():
      name = f'{prefix}{key}'
      if hasattr(value, 'items'):
        visit(f'{name}.', value)
      else:
        flat[name] = value if isinstance(value, (bool, int, float, str)) else str(value)

  visit('', config)
  return flat


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """All scalars in the event files under `logdir`: {tag: [(step, value), ...]} sorted by step.

  Reads both forms writers use: `simple_value`, and the scalar tensors of `tf.summary`.
  """
  from tensorboard.backend.event_processing import event_file_loader
  from tensorboard.util import tensor_util

  scalars: dict[str, dict[int, float]] = {}
  for root, _, files in os.walk(logdir):
    for name in sorted(f for f in files if 'tfevents' in f):
      for event in event_file_loader.EventFileLoader(os.path.join(root, name)).Load():
        for value in event.summary.value:
          if value.HasField('simple_value'):
            number = value.simple_value
          elif value.HasField('tensor') and value.metadata.plugin_data.plugin_name == 'scalars':
            number = float(np.asarray(tensor_util.make_ndarray(value.tensor)))
          else:
            continue
          scalars.setdefault(value.tag, {})[event.step] = number
  return {tag: sorted(points.items()) for tag, points in scalars.items()}
