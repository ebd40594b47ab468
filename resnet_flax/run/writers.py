"""Metric writers: clu's TensorBoard writer, or a TensorFlow-free one where TensorFlow is absent, and
`metrics.csv` beside them.

`clu.metric_writers` imports TensorFlow, which the GPU machines do not have. There the
`EventFileWriter` of the `tensorboard` package writes the same event files by itself.

`<workdir>/metrics.csv` holds the same scalars for any spreadsheet or pandas: one row per logged
training step and one per evaluation, with the columns `step`, `epoch` (step / steps per epoch),
`kind` (`eval` for a row of `eval_*` metrics, else `train`), then every metric name seen so far (a
row leaves the others empty). Rows are appended and flushed as they come; a metric that appears
later rewrites the file with the wider header. A resumed run first drops the rows after the step it
resumes from (`drop_csv_rows_after`), so no step appears twice.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from resnet_flax.errors import DiskFullError, is_disk_full
from resnet_flax.run.workdir import epochs_at


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


METRICS_CSV = 'metrics.csv'


class CsvMetricWriter:
  """Writes the scalars of each `write_scalars` call as one row of a CSV file (see the module docstring)."""

  def __init__(self, path: str, steps_per_epoch: int):
    self._path, self._steps_per_epoch = path, steps_per_epoch
    self._file = None  # Opened at the first row: a resumed run drops later rows before that.
    self._columns: list[str] = []

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    if self._file is None:
      self._columns = _read_csv(self._path)[0] if os.path.exists(self._path) else []
      self._file = open(self._path, 'a', newline='')
    kind = 'eval' if all(name.startswith('eval_') for name in scalars) else 'train'
    row = {'step': step, 'epoch': round(epochs_at(step, self._steps_per_epoch), 4), 'kind': kind}
    row.update({name: _csv_number(value) for name, value in scalars.items()})
    new_columns = [name for name in row if name not in self._columns]
    if new_columns:
      self._file.close()
      self._columns += new_columns
      _write_csv(self._path, self._columns, _read_csv(self._path)[1])
      self._file = open(self._path, 'a', newline='')
    csv.DictWriter(self._file, self._columns).writerow(row)
    self._file.flush()

  def write_hparams(self, hparams: Mapping[str, Any]):
    """Not a row: config.json holds the hyperparameters."""

  def flush(self):
    if self._file is not None:
      self._file.flush()

  def close(self):
    if self._file is not None:
      self._file.close()
      self._file = None


def _csv_number(value: Any) -> int | str:
  """Integers as they are; other numbers as the float32 TensorBoard keeps, in the fewest digits that
  read back as that float32 (0.1, not 0.10000000149011612)."""
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    return int(value)
  return str(np.float32(value))


def _read_csv(path: str) -> tuple[list[str], list[dict[str, str]]]:
  with open(path, newline='') as f:
    reader = csv.DictReader(f)
    return list(reader.fieldnames or []), list(reader)


def _write_csv(path: str, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]):
  """Replaces `path` atomically: a crash leaves the old file or the new one, never half of one."""
  with open(f'{path}.tmp', 'w', newline='') as f:
    writer = csv.DictWriter(f, columns, restval='')
    writer.writeheader()
    writer.writerows(rows)
  os.replace(f'{path}.tmp', path)


def read_csv_rows(logdir: str) -> list[dict[str, str]]:
  """The rows of `<logdir>/metrics.csv` ([] without one); an empty string where a row has no value."""
  path = os.path.join(logdir, METRICS_CSV)
  return _read_csv(path)[1] if os.path.exists(path) else []


def drop_csv_rows_after(logdir: str, step: int) -> None:
  """Keeps the rows of `<logdir>/metrics.csv` up to `step` (a killed run may have logged past its last
  checkpoint); also drops a last line a kill cut short."""
  path = os.path.join(logdir, METRICS_CSV)
  if not os.path.exists(path):
    return
  columns, rows = _read_csv(path)
  kept = [row for row in rows if None not in row.values() and row['step'].isdigit() and int(row['step']) <= step]
  _write_csv(path, columns, kept)


class MultiWriter:
  """Passes each call on to every writer (clu's MultiWriter would import TensorFlow)."""

  def __init__(self, writers: Sequence[Any]):
    self._writers = list(writers)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    for writer in self._writers:
      writer.write_scalars(step, scalars)

  def write_hparams(self, hparams: Mapping[str, Any]):
    for writer in self._writers:
      writer.write_hparams(hparams)

  def flush(self):
    for writer in self._writers:
      writer.flush()

  def close(self):
    for writer in self._writers:
      writer.close()


def create_writer(logdir: str, is_primary: bool, steps_per_epoch: int):
  """On the primary process clu's default writer (TensorBoard + log) and metrics.csv; logging only elsewhere."""
  try:
    from clu import metric_writers
  except ImportError:
    logging.warning('TensorFlow is not importable: writing TensorBoard events without it.')
    if not is_primary:
      return _LoggingOnly()
    tensorboard = EventFileMetricWriter(logdir)
  else:
    tensorboard = metric_writers.create_default_writer(logdir, just_logging=not is_primary, asynchronous=True)
    if not is_primary:
      return tensorboard
  return MultiWriter([tensorboard, CsvMetricWriter(os.path.join(logdir, METRICS_CSV), steps_per_epoch)])


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


def flush_at_the_end(writer: Any, workdir: str) -> None:
  """Flushes `writer` when a run ends, in a `finally`. A full disk is one clear error; when the run already
  failed (usually the same full disk, met by a checkpoint, whose error says which checkpoint is intact), that
  error stays the one the user sees, and this one is logged."""
  failing = sys.exc_info()[1]
  try:
    writer.flush()
  except Exception as e:
    if not is_disk_full(e):
      raise
    if failing is not None:
      logging.warning('The TensorBoard events of the last steps were not written either: the disk is full')
      return
    raise DiskFullError(
      f'no space left on the device while writing the TensorBoard events in {workdir} (the checkpoints are '
      'intact); free some space and rerun the same command to resume'
    ) from e
