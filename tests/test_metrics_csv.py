"""metrics.csv: one row per logged step and per evaluation, a header that grows, no duplicate steps after a resume."""

import csv
import signal
import sys
import time

import clu
import numpy as np
import pytest

from resnet_flax.run import writers

import helpers

STEPS_PER_EPOCH = 8


def read_rows(workdir) -> tuple[list[str], list[dict[str, str]]]:
  with open(workdir / writers.METRICS_CSV, newline='') as f:
    reader = csv.DictReader(f)
    return list(reader.fieldnames), list(reader)


def test_rows_are_appended_as_they_come_and_a_new_metric_widens_the_header(tmp_path):
  writer = writers.CsvMetricWriter(str(tmp_path / writers.METRICS_CSV), STEPS_PER_EPOCH)
  writer.write_scalars(4, {'train_loss': np.float32(0.1), 'train_accuracy': 0.25})
  assert read_rows(tmp_path) == (  # Flushed at once: readable while the run goes on.
    ['step', 'epoch', 'kind', 'train_loss', 'train_accuracy'],
    [{'step': '4', 'epoch': '0.5', 'kind': 'train', 'train_loss': '0.1', 'train_accuracy': '0.25'}],
  )
  writer.write_scalars(8, {'train_loss': 0.05, 'train_accuracy': 0.5, 'train_nonfinite_steps': 2})
  writer.write_scalars(8, {'eval_loss': 1.5, 'eval_accuracy': 0.625})
  columns, rows = read_rows(tmp_path)
  assert columns == [
    'step',
    'epoch',
    'kind',
    'train_loss',
    'train_accuracy',
    'train_nonfinite_steps',
    'eval_loss',
    'eval_accuracy',
  ]
  assert [(row['step'], row['epoch'], row['kind']) for row in rows] == [
    ('4', '0.5', 'train'),
    ('8', '1.0', 'train'),
    ('8', '1.0', 'eval'),
  ]
  assert rows[0]['train_loss'] == '0.1' and rows[0]['train_nonfinite_steps'] == rows[0]['eval_loss'] == ''
  assert rows[1]['train_nonfinite_steps'] == '2' and rows[2]['eval_accuracy'] == '0.625'
  assert rows[2]['train_loss'] == ''
  writer.close()


def test_a_resume_drops_the_rows_after_its_step_and_continues_the_file(tmp_path):
  path = tmp_path / writers.METRICS_CSV
  writer = writers.CsvMetricWriter(str(path), STEPS_PER_EPOCH)
  for step in range(1, 14):
    writer.write_scalars(step, {'train_loss': 1.0 / step})
    if step % 8 == 0:
      writer.write_scalars(step, {'eval_accuracy': 0.5})
  writer.close()
  with open(path, 'a') as f:
    f.write('14,1.75,tra')  # A kill in the middle of a row.

  writers.drop_csv_rows_after(str(tmp_path), 10)  # The checkpoint the run resumes from.
  resumed = writers.CsvMetricWriter(str(path), STEPS_PER_EPOCH)
  for step in range(11, 17):
    resumed.write_scalars(step, {'train_loss': 1.0 / step, 'train_learning_rate': 0.1})
  resumed.write_scalars(16, {'eval_accuracy': 0.75})
  resumed.close()

  columns, rows = read_rows(tmp_path)
  assert columns == ['step', 'epoch', 'kind', 'train_loss', 'eval_accuracy', 'train_learning_rate']
  train_steps = [int(row['step']) for row in rows if row['kind'] == 'train']
  assert train_steps == list(range(1, 17))
  assert [(row['step'], row['eval_accuracy']) for row in rows if row['kind'] == 'eval'] == [
    ('8', '0.5'),
    ('16', '0.75'),
  ]
  assert [row['train_learning_rate'] for row in rows[:11]] == [''] * 11 and rows[-2]['train_learning_rate'] == '0.1'


@pytest.mark.parametrize('with_tensorflow', [True, False])
def test_the_primary_writer_writes_metrics_csv_beside_tensorboard_others_write_nothing(
  tmp_path, monkeypatch, with_tensorflow
):
  if not with_tensorflow:  # As on a machine without TensorFlow, where clu.metric_writers cannot be imported.
    monkeypatch.setitem(sys.modules, 'clu.metric_writers', None)
    monkeypatch.delattr(clu, 'metric_writers', raising=False)
  writer = writers.create_writer(str(tmp_path / 'primary'), is_primary=True, steps_per_epoch=STEPS_PER_EPOCH)
  writer.write_hparams({'batch_size': 64})
  writer.write_scalars(2, {'train_loss': 0.5})
  writer.flush()
  assert read_rows(tmp_path / 'primary')[1] == [{'step': '2', 'epoch': '0.25', 'kind': 'train', 'train_loss': '0.5'}]
  assert writers.read_scalars(str(tmp_path / 'primary'))['train_loss'] == [(2, 0.5)]
  other = writers.create_writer(str(tmp_path / 'other'), is_primary=False, steps_per_epoch=STEPS_PER_EPOCH)
  other.write_scalars(2, {'train_loss': 0.5})
  other.flush()
  assert not (tmp_path / 'other' / writers.METRICS_CSV).exists()


@pytest.mark.slow
def test_metrics_csv_after_a_kill_and_resume_holds_each_step_once(tmp_path):
  args = ('--config.num_epochs=2', '--config.log_every_steps=1')  # 16 steps; checkpoints every 5.
  process = helpers.run_main(tmp_path, *args, wait=False)
  deadline = time.time() + 120
  while not helpers.finished_steps(tmp_path) and time.time() < deadline:
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  process.wait()
  killed_at = helpers.finished_steps(tmp_path)
  assert killed_at and killed_at[-1] < 16

  returncode, output = helpers.run_main(tmp_path, *args)
  assert returncode == 0, output
  columns, rows = read_rows(tmp_path)
  assert columns[:3] == ['step', 'epoch', 'kind'] and {'train_loss', 'steps_per_sec', 'eval_accuracy'} <= set(columns)
  assert [int(row['step']) for row in rows if row['kind'] == 'train'] == list(range(1, 17))
  assert [int(row['step']) for row in rows if row['kind'] == 'eval'] == [8, 16]
  assert [float(row['epoch']) for row in rows if row['kind'] == 'eval'] == [1.0, 2.0]
  scalars = writers.read_scalars(str(tmp_path))  # TensorBoard keeps float32, as the CSV does.
  tensorboard_steps, tensorboard_losses = zip(*scalars['train_loss'], strict=True)
  assert tensorboard_steps == tuple(range(1, 17))
  np.testing.assert_array_equal(
    [np.float32(row['train_loss']) for row in rows if row['kind'] == 'train'], tensorboard_losses
  )
