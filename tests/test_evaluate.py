"""Evaluation reports, test-time augmentation, class matching by name, predictions and plots.

One tiny model is trained per module on 12 synthetic classes: more than 5 (top-5 accuracy), and
an image folder sorts 'class_10' and 'class_11' before 'class_2', a real reordering.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import f1_score, precision_recall_fscore_support, precision_score, recall_score

import resnet_flax
from configs import smoke
from resnet_flax import data, evaluate
from resnet_flax.data import DataError, augment, images
from resnet_flax.deploy import predict
from resnet_flax.errors import ConfigError
from resnet_flax.evaluate import inference, metrics
from resnet_flax.models import trained
from resnet_flax.run import checkpoint, curves, distributed, report_paths, writers
from resnet_flax.run.workdir import LATER_FACTS, RunInfo
from resnet_flax.train import config_checks, trainer

import helpers
from helpers import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 12
TEST_SIZE = 200
SMOKE_ARGS = [
  '--config=configs/smoke.py',
  '--config.num_epochs=1',
  f'--config.data.synthetic_num_classes={NUM_CLASSES}',
]
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def smoke_config(**eval_fields):
  config = smoke.get_config()
  config.num_epochs = 1.0  # 8 steps.
  config.data.synthetic_num_classes = NUM_CLASSES
  config.eval.update(eval_fields)
  return config


def folder_config(root: Path):
  config = smoke_config()
  config.data.source, config.data.path = 'folder', str(root)
  return config


def run_main(workdir, *args, devices: int = 1):
  process = subprocess.run(
    [sys.executable, 'main.py', f'--workdir={workdir}', *SMOKE_ARGS, *args],
    cwd=ROOT,
    env=subprocess_env(devices),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    timeout=300,
  )
  return process.returncode, process.stdout


def is_png(path: Path) -> bool:
  return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000


@pytest.fixture(scope='module')
def test_split():
  return data.load_splits(smoke_config().data)['test']


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('trained')
  trainer.train_and_evaluate(smoke_config(), str(workdir))
  return workdir


@pytest.fixture(scope='module')
def report(workdir):
  return evaluate.evaluate_checkpoint(smoke_config(), str(workdir))


@pytest.fixture(scope='module')
def restored(workdir):
  mesh = distributed.create_mesh()
  return trained.restore_workdir(str(workdir), smoke_config(), 'latest', mesh), mesh


def report_dir(workdir, config) -> Path:
  return helpers.indexed_report_dir(workdir, config.data)


def write_png(path: Path, image: np.ndarray):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(image).save(path)


def image_folder(root: Path, split, classes, unknown_classes=()) -> Path:
  """`root/{train,test}/<class>/`: the test images of `classes`, one train image per class."""
  for i, (image, label) in enumerate(zip(split.images, split.labels, strict=True)):
    if split.class_names[label] in classes:
      write_png(root / 'test' / split.class_names[label] / f'{i:04d}.png', image)
  for name in unknown_classes:
    write_png(root / 'test' / name / '0.png', split.images[0])
  for name in [*classes, *unknown_classes]:
    write_png(root / 'train' / name / '0.png', split.images[0])
  return root


def test_report_holds_every_example_once_and_consistent_metrics(workdir, report):
  directory = report_dir(workdir, smoke_config())
  assert json.loads((directory / 'report.json').read_text()) == report
  matrix = np.array(report['confusion_matrix'])
  assert report['num_examples'] == TEST_SIZE == matrix.sum()
  assert report['accuracy'] == np.trace(matrix) / TEST_SIZE
  assert report['class_names'] == report['predicted_class_names'] == [f'class_{i}' for i in range(NUM_CLASSES)]
  for i, name in enumerate(report['class_names']):
    assert report['per_class_accuracy'][name] == pytest.approx(matrix[i, i] / matrix[i].sum())
  assert report['per_class_recall'] == pytest.approx(report['per_class_accuracy'])
  assert 0 < report['macro_f1'] <= 1 and set(report['per_class_f1']) == set(report['class_names'])
  assert report['accuracy'] <= report['top5_accuracy'] <= 1
  assert 0 <= report['expected_calibration_error'] <= 1
  assert report['tta'] == 'none' and report['checkpoint_step'] == 8
  scalars = writers.read_scalars(str(workdir))  # The evaluation during training saw the same weights.
  assert report['accuracy'] == pytest.approx(scalars['eval_accuracy'][-1][1], abs=1e-6)
  assert report['loss'] == pytest.approx(scalars['eval_loss'][-1][1], rel=1e-5)
  assert 'tta_accuracy' not in report
  assert is_png(directory / 'confusion_matrix.png') and is_png(directory / 'per_class.png')


def test_evaluating_twice_gives_identical_reports(workdir, report):
  assert evaluate.evaluate_checkpoint(smoke_config(), str(workdir)) == report


# Another device count gives each device another batch (16 examples on 4 devices, not 64), for which the CPU's
# convolution and matmul kernels may sum in another order (other blocking, other vector width: AVX2 or AVX-512),
# so a float32 logit may differ by a few ulps: ~1e-6, the logits being below 8 in size (ulp 4.8e-7). A
# log-probability z_i - logsumexp(z) then moves by at most 2 max|dz| ~ 2e-6: each probability by that relative
# amount, and float64 means of them by that absolute amount: the loss (a mean of -log p) and the ECE (a mean of the
# |accuracy - confidence| gaps of its bins, a confidence being a max p). LOGIT_TOLERANCE leaves a factor 5 (seen on
# an AVX2 host: the loss 5e-10 apart, the ECE in the 9th digit). The rest of a report is exact: counts and ratios of
# counts, which see the logits through their argmax only, exact unless two logits tie within a few ulps (this model's
# closest two are 2e-3 apart). Where the logits differ at all, a confidence within ~2e-6 of one of the 14 ECE bin
# boundaries may cross it, moving the ECE by up to 2/200: for the 200 confidences a chance of 1% if every one moved
# that much, far less at the shifts seen (the loss moved 5e-5 of the bound).
LOGIT_TOLERANCE = 1e-5
FROM_LOGITS = ('loss', 'expected_calibration_error')


def assert_same_report(actual: dict, expected: dict):
  """`actual`, of another device count, is `expected`: FROM_LOGITS within LOGIT_TOLERANCE, the rest exactly."""
  assert sorted(actual) == sorted(expected)
  for key, value in expected.items():
    if key in FROM_LOGITS:
      assert actual[key] == pytest.approx(value, rel=0, abs=LOGIT_TOLERANCE), key
    else:
      assert actual[key] == value, key


def test_four_devices_give_the_report_of_one(workdir, report, restored, test_split):
  returncode, output = run_main(workdir, '--mode=evaluate', devices=4)
  assert returncode == 0, output
  directory = report_dir(workdir, smoke_config())
  assert_same_report(json.loads((directory / 'report.json').read_text()), report)
  restored_run, mesh = restored  # One device, in this process.
  logits = inference.forward(restored_run, test_split, 64, 'none', mesh)['logits']
  saved = np.load(directory / evaluate.PREDICTIONS_FILE)
  np.testing.assert_array_equal(saved['label'], test_split.labels)  # The model's classes are the data's.
  np.testing.assert_array_equal(saved['prediction'], logits.argmax(axis=1))
  np.testing.assert_allclose(saved['probabilities'], np.exp(metrics.log_softmax(logits)), rtol=LOGIT_TOLERANCE)


@pytest.mark.parametrize(
  'classes',
  [
    [f'class_{i}' for i in range(NUM_CLASSES)],  # The folder sorts them: class_0, class_1, class_10, ...
    ['class_10', 'class_3', 'class_7'],
  ],
)
def test_folder_classes_are_matched_by_name(workdir, report, test_split, tmp_path, classes):
  config = folder_config(image_folder(tmp_path / 'images', test_split, classes))
  folder_report = evaluate.evaluate_checkpoint(config, str(workdir))
  assert folder_report['class_names'] == sorted(classes) != report['class_names'][: len(classes)]
  assert folder_report['predicted_class_names'][: len(classes)] == sorted(classes)
  assert folder_report['per_class_accuracy'] == {name: report['per_class_accuracy'][name] for name in sorted(classes)}
  matrix, original = np.array(folder_report['confusion_matrix']), np.array(report['confusion_matrix'])
  columns = [report['predicted_class_names'].index(name) for name in folder_report['predicted_class_names']]
  for i, name in enumerate(folder_report['class_names']):
    np.testing.assert_array_equal(matrix[i], original[report['class_names'].index(name), columns])
  assert (
    folder_report['num_examples']
    == matrix.sum()
    == np.isin(np.array(test_split.class_names)[test_split.labels], classes).sum()
  )
  assert folder_report['accuracy'] == np.trace(matrix) / matrix.sum()
  assert report_dir(workdir, config) != report_dir(workdir, smoke_config())


def test_a_class_the_model_does_not_know_is_named(workdir, test_split, tmp_path):
  root = image_folder(tmp_path / 'images', test_split, ['class_3'], unknown_classes=['zebra'])
  with pytest.raises(DataError, match=r"does not know the classes \['zebra'\].*'class_0', 'class_1'"):
    evaluate.evaluate_checkpoint(folder_config(root), str(workdir))


def test_classes_are_found_by_name_and_one_the_model_lacks_is_none_or_a_data_error():
  model_class_names = ('cat', 'dog', 'bird')
  assert data.class_indices(['bird', 'cat'], model_class_names).tolist() == [2, 0]
  assert [data.class_index(name, model_class_names) for name in ('dog', 'zebra')] == [1, None]
  with pytest.raises(DataError, match=r"does not know the classes \['zebra'\].*'cat', 'dog', 'bird'"):
    data.class_indices(['cat', 'zebra'], model_class_names)


def test_no_checkpoint_is_one_clear_line(tmp_path):
  returncode, output = run_main(tmp_path, '--mode=evaluate')
  assert returncode != 0
  assert output.strip().splitlines()[-1] == (
    f'error: {tmp_path} has no checkpoint to evaluate: train first with --mode=train --workdir={tmp_path}, '
    'or point --workdir at a trained run'
  )


def test_tta_averages_the_softmax_of_the_views(workdir, restored, test_split):
  restored_run, mesh = restored
  plain = inference.forward(restored_run, test_split, 64, 'none', mesh)['logits']
  mirrored = data.ImageData(test_split.images[:, :, ::-1], test_split.labels, test_split.class_names)
  mirrored_logits = inference.forward(restored_run, mirrored, 64, 'none', mesh)['logits']
  expected = (np.exp(metrics.log_softmax(plain)) + np.exp(metrics.log_softmax(mirrored_logits))) / 2
  np.testing.assert_allclose(
    inference.forward(restored_run, test_split, 64, 'flip', mesh)['tta_probabilities'], expected, atol=1e-6
  )
  report = evaluate.evaluate_checkpoint(smoke_config(tta='flip'), str(workdir))
  assert report['tta'] == 'flip' and report['tta_views'] == 2
  assert report['tta_accuracy'] == np.mean(expected.argmax(axis=1) == test_split.labels)


def test_translated_views_move_the_image_one_pixel_each_way():
  images = jnp.arange(2 * 5 * 5 * 3, dtype=jnp.uint8).reshape(2, 5, 5, 3)
  np.testing.assert_array_equal(augment.view(images, False, 1)[:, 1:, 1:], images[:, :-1, :-1])
  np.testing.assert_array_equal(augment.view(images, False, -1)[:, :-1, :-1], images[:, 1:, 1:])
  np.testing.assert_array_equal(augment.view(images, True, 0), images[:, :, ::-1])
  assert len(set(augment.TTA_VIEWS['flip+translate'])) == 6


def test_predict_gives_sorted_top_k_and_the_class_evaluation_predicts(workdir, restored, test_split, tmp_path, capsys):
  restored_run, mesh = restored
  for i in range(5):
    write_png(tmp_path / 'images' / f'{i}.png', test_split.images[i])
  output = tmp_path / 'predictions.json'
  rows = predict.run_predict(smoke_config(), str(workdir), [str(tmp_path / 'images')], 3, str(output))
  logits = inference.forward(restored_run, test_split, 64, 'none', mesh)['logits'][:5]
  assert [row['path'] for row in rows] == [str(tmp_path / 'images' / f'{i}.png') for i in range(5)]
  for row, example_logits in zip(rows, logits, strict=True):
    probabilities = [t['probability'] for t in row['top_k']]
    assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) <= 1 + 1e-6
    assert row['top_k'][0]['class'] == test_split.class_names[example_logits.argmax()]
  assert json.loads(output.read_text())['predictions'] == rows
  table = capsys.readouterr().out.splitlines()
  assert table[0].startswith('image') and len(table) == 6 and rows[0]['top_k'][0]['class'] in table[1]


def test_any_image_is_resized_as_the_run_was_and_the_api_matches_evaluation(workdir, test_split, tmp_path):
  """The Python API gives evaluation's predictions on the test images, and an image of another size,
  shape and format is resized by the recorded policy as a file and as an array alike."""
  model = resnet_flax.load(str(workdir))
  assert model.class_names == test_split.class_names and model.image_size == (32, 32) and model.step == 8
  evaluate.evaluate_checkpoint(smoke_config(), str(workdir))  # Other tests write other predictions there.
  saved = np.load(report_dir(workdir, smoke_config()) / evaluate.PREDICTIONS_FILE)
  probabilities = model.predict(test_split.images)
  np.testing.assert_array_equal(probabilities.argmax(axis=1), saved['prediction'])
  np.testing.assert_allclose(probabilities, saved['probabilities'], atol=1e-6)
  assert model.predict_classes(test_split.images[:3]) == [model.class_names[i] for i in saved['prediction'][:3]]

  photo = np.random.default_rng(0).integers(0, 256, (90, 120, 4), np.uint8)  # RGBA, 4:3.
  Image.fromarray(photo).save(tmp_path / 'photo.webp', lossless=True)
  expected = images.to_model_input(photo, (32, 32), model.resize_policy)
  np.testing.assert_array_equal(model.pixels(str(tmp_path / 'photo.webp')), expected[None])
  rows, _ = predict.predict(smoke_config(), str(workdir), [str(tmp_path)], 3)
  np.testing.assert_allclose(
    [t['probability'] for t in rows[0]['top_k']], np.sort(model.predict(expected))[0, ::-1][:3], atol=1e-6
  )


def test_training_curves_are_drawn_from_tensorboard(workdir, report, tmp_path):
  assert is_png(workdir / 'training_curves.png')  # Written at the end of training and by evaluation.
  (workdir / 'training_curves.png').unlink()
  assert curves.write_training_curves(str(workdir), 8) == str(workdir / 'training_curves.png')
  assert is_png(workdir / 'training_curves.png')
  assert curves.write_training_curves(str(tmp_path), 8) is None


def test_run_json_facts_spare_the_training_data_and_old_config_files_work(workdir, report, tmp_path):
  """With the class names and normalization in run.json, config.json's training data is not read; a
  config.json written before a field existed takes the current default."""
  copy = tmp_path / 'copy'
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns('eval', '*.png'))
  run = trained.load_trained_run(str(workdir), smoke_config())
  saved = json.loads((copy / 'run.json').read_text())
  saved.update(
    class_names=list(run.info.class_names),
    pixel_mean=list(run.info.pixel_mean),
    pixel_std=list(run.info.pixel_std),
    steps_per_epoch=run.info.steps_per_epoch,
  )
  (copy / 'run.json').write_text(json.dumps(saved))
  config = json.loads((copy / 'config.json').read_text())
  config['data'].update(source='folder', path=str(tmp_path / 'gone'))
  del config['model']['zero_init_residual']
  (copy / 'config.json').write_text(json.dumps(config))
  copy_report = evaluate.evaluate_checkpoint(smoke_config(), str(copy))
  assert {**copy_report, 'workdir': report['workdir']} == report


class FakeManager:
  def __init__(self, metrics):
    self._metrics = metrics
    self.directory = 'w/checkpoints'

  def all_steps(self):
    return sorted(self._metrics)

  def metrics(self, step):
    return self._metrics[step]


def test_checkpoint_choice_is_by_validation_only():
  manager = FakeManager({5: {'accuracy': 0.9}, 10: {'accuracy': 0.5}, 12: None})
  validated, unvalidated = (
    RunInfo('m', 0.0, '', (8, 8, 3), ('a',), (0.5,), (0.5,), 1, validation=v) for v in ('val', '')
  )
  assert checkpoint.choose_step(manager, 'best', validated) == 5
  assert checkpoint.choose_step(manager, 'best', unvalidated) == 12  # Metrics an earlier version ranked by test.
  assert checkpoint.choose_step(manager, 'latest', validated) == 12
  assert checkpoint.choose_step(manager, '10', validated) == 10
  assert checkpoint.choose_step(FakeManager({5: None, 10: None}), 'best', validated) == 10
  with pytest.raises(ConfigError, match=r'no checkpoint of step 7 .* steps \[5, 10, 12\]'):
    checkpoint.choose_step(manager, '7', validated)


def test_config_rules_accept_exactly_the_eval_choices():
  assert all(config_checks.RULES['eval.tta'](mode) is None for mode in augment.TTA_VIEWS)
  assert config_checks.RULES['eval.tta']('mirror') is not None
  assert all(config_checks.RULES['eval.checkpoint'](v) is None for v in ('best', 'latest', '120'))
  assert config_checks.RULES['eval.checkpoint']('newest') is not None


def test_report_names_keep_datasets_apart(tmp_path):
  names = set()
  for parent in ('a', 'b'):
    config = folder_config(tmp_path / parent / 'pets')
    assert report_paths.report_name(config.data) == report_paths.report_name(
      folder_config(tmp_path / parent / 'pets').data
    )
    names.add(report_paths.report_name(config.data))
  names.add(report_paths.report_name(smoke_config().data))
  assert len(names) == 3 and all(
    name.startswith('folder-pets-test-') for name in names - {report_paths.report_name(smoke_config().data)}
  )


def test_a_run_json_of_the_first_versions_takes_its_facts_from_the_training_data(workdir, report, tmp_path):
  """run.json once held no class names, normalisation or epoch length: they come from config.json's data."""
  copy = tmp_path / 'copy'
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns('eval', '*.png'))
  saved = json.loads((copy / 'run.json').read_text())
  (copy / 'run.json').write_text(json.dumps({k: v for k, v in saved.items() if k not in LATER_FACTS}))
  assert {**evaluate.evaluate_checkpoint(smoke_config(), str(copy)), 'workdir': report['workdir']} == report
  config = json.loads((copy / 'config.json').read_text())
  config['data']['synthetic_num_classes'] = NUM_CLASSES + 1
  (copy / 'config.json').write_text(json.dumps(config))
  with pytest.raises(DataError, match=f'now has {NUM_CLASSES + 1} classes but the checkpoints have {NUM_CLASSES}'):
    evaluate.evaluate_checkpoint(smoke_config(), str(copy))


# Nine predictions among 4 classes, by their confidence (the top probability) and whether they are right. With
# ECE_BINS = 15 (bin b holds [b/15, (b+1)/15), the last one 1 too) they fall in three bins:
#   bin 14 [0.933, 1]: 0.95, 0.95, 0.95, 1.0, right 3 of 4: |0.75 - 3.85/4| = 0.2125, weighed 4/9
#   bin 7 [0.467, 0.533): 0.5, 0.5, right 1 of 2: |0.5 - 0.5| = 0
#   bin 4 [0.267, 0.333): 0.3, 0.3, 0.3, right 2 of 3: |2/3 - 0.3| = 0.3667, weighed 3/9
# ECE = (4 x 0.2125 + 3 x 0.3667) / 9 = (0.85 + 1.1) / 9. In one bin: |6/9 - (3.85 + 1 + 1 + 0.9) / 9| = 0.25 / 9.
CALIBRATION_CASES = [(0.95, True), (0.95, True), (0.95, False), (1.0, True), (0.5, True), (0.5, False)]
CALIBRATION_CASES += [(0.3, True), (0.3, True), (0.3, False)]
HAND_ECE, HAND_ECE_ONE_BIN = 1.95 / 9, 0.25 / 9


def test_expected_calibration_error_is_the_hand_computed_one():
  confidences = np.array([confidence for confidence, _ in CALIBRATION_CASES])
  correct = np.array([right for _, right in CALIBRATION_CASES])
  assert metrics.expected_calibration_error(confidences, correct) == pytest.approx(HAND_ECE, abs=1e-12)
  assert metrics.expected_calibration_error(confidences, correct, num_bins=1) == pytest.approx(HAND_ECE_ONE_BIN)
  assert metrics.expected_calibration_error(np.full(4, 0.75), np.array([True, True, True, False])) == 0.0
  # In the report: the confidence is the top softmax probability (class 0's here), right when the label is 0.
  others = (1 - confidences[:, None]) / 3 * np.ones((1, 3))
  logits = np.log(np.concatenate([confidences[:, None], np.maximum(others, 1e-300)], axis=1))
  labels = np.where(correct, 0, 1)
  names = ['a', 'b', 'c', 'd']
  report = metrics.classification_metrics({'logits': logits}, labels, np.arange(4), names, names)
  assert report['expected_calibration_error'] == pytest.approx(HAND_ECE, abs=1e-12)


@pytest.mark.parametrize('seed', range(3))
def test_precision_recall_and_f1_are_scikit_learns_on_random_predictions(seed):
  """The data holds 6 of the model's 8 classes, reordered, one of them without images; predictions of the model's
  other classes cost recall only. 0/0 is 0.0, the value of scikit-learn's default zero_division='warn'."""
  rng = np.random.default_rng(seed)
  model_class_names = [f'class_{j}' for j in range(8)]
  class_names = ['class_4', 'class_0', 'class_6', 'class_2', 'class_5', 'class_1']
  label_to_model = data.class_indices(class_names, model_class_names)
  labels = rng.integers(0, 5, 300)  # class_1 has no images.
  logits = rng.normal(size=(300, 8))
  logits[:, 2] -= 100  # class_2 is never predicted.
  report = metrics.classification_metrics({'logits': logits}, labels, label_to_model, class_names, model_class_names)
  y_true, y_pred, data_classes = label_to_model[labels], logits.argmax(axis=1), label_to_model
  precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=data_classes, zero_division=0.0)
  for i, name in enumerate(class_names):
    assert report['per_class_precision'][name] == pytest.approx(precision[i], abs=1e-12)
    assert report['per_class_recall'][name] == pytest.approx(recall[i], abs=1e-12)
    assert report['per_class_f1'][name] == pytest.approx(f1[i], abs=1e-12)
  assert report['per_class_precision']['class_2'] == 0.0 and report['per_class_recall']['class_1'] == 0.0
  macro = dict(y_true=y_true, y_pred=y_pred, average='macro', labels=data_classes, zero_division=0.0)
  assert report['macro_precision'] == pytest.approx(precision_score(**macro), abs=1e-12)
  assert report['macro_recall'] == pytest.approx(recall_score(**macro), abs=1e-12)
  assert report['macro_f1'] == pytest.approx(f1_score(**macro), abs=1e-12)
