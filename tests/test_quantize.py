"""int8 with qwix: PTQ evaluation of a float run, a QAT fine-tune, and both served in int8.

The float run is a copy of the shared smoke run (`straight_run`: resnet_tiny, 10 synthetic classes,
no validation split, so training evaluates on the test split); the QAT run fine-tunes it for one
epoch (8 steps, checkpoints at 5 and 8).
"""

import json
import shutil
from pathlib import Path

import flax
import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

import resnet_flax
from configs import smoke
from resnet_flax import evaluate, models
from resnet_flax.compress import quantize
from resnet_flax.errors import ConfigError
from resnet_flax.run import writers
from resnet_flax.train import config_checks, trainer

import helpers
from helpers import finished_steps, load_checkpoint, run_main

QAT_STEPS = 8


def smoke_config(**fields) -> ml_collections.ConfigDict:
  """The smoke config of `straight_run`; `fields` are dotted config fields."""
  config = smoke.get_config()
  config.update_from_flattened_dict(fields)
  return config


def qat_config(init_from, **fields) -> ml_collections.ConfigDict:
  return smoke_config(**{'num_epochs': 1.0, 'init_from': str(init_from), 'quantize.mode': 'qat', **fields})


def report_dir(workdir, label: str = 'plain') -> Path:
  return helpers.indexed_report_dir(workdir, smoke_config().data, label)


def report_dirs(workdir) -> list[str]:
  return sorted(p.name for p in (workdir / 'eval').iterdir() if p.is_dir())


def leaves(tree) -> dict:
  return flax.traverse_util.flatten_dict(tree, sep='/')


@pytest.fixture(scope='module')
def float_run(straight_run, tmp_path_factory):
  """A copy of the smoke run (evaluations write into it) and its float and PTQ evaluation reports."""
  workdir = tmp_path_factory.mktemp('float') / 'run'
  shutil.copytree(straight_run, workdir, ignore=shutil.ignore_patterns('eval'))  # Others' reports.
  reports = {
    mode: evaluate.evaluate_checkpoint(smoke_config(**{'quantize.mode': mode}), str(workdir))
    for mode in ('none', 'ptq')
  }
  return workdir, reports


@pytest.fixture(scope='module')
def qat_run(straight_run, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('qat')
  trainer.train_and_evaluate(qat_config(straight_run), str(workdir))
  return workdir


# PTQ.


def test_ptq_evaluation_agrees_with_float_in_a_report_of_its_own(float_run):
  workdir, reports = float_run
  assert report_dirs(workdir) == sorted([report_dir(workdir).name, report_dir(workdir, 'int8-ptq').name])
  predictions = {}
  for mode, label in (('none', 'plain'), ('ptq', 'int8-ptq')):
    assert json.loads((report_dir(workdir, label) / 'report.json').read_text())['accuracy'] == reports[mode]['accuracy']
    predictions[mode] = np.load(report_dir(workdir, label) / evaluate.PREDICTIONS_FILE)
  assert np.mean(predictions['ptq']['prediction'] == predictions['none']['prediction']) >= 0.9
  difference = np.abs(predictions['ptq']['probabilities'] - predictions['none']['probabilities'])
  assert 0 < difference.max() < 0.05  # Close, and computed otherwise.
  assert abs(reports['ptq']['accuracy'] - reports['none']['accuracy']) <= 0.05
  float_bytes, int8_bytes = reports['none']['quantize'], reports['ptq']['quantize']
  assert float_bytes['mode'] == 'none' and int8_bytes['mode'] == 'ptq'
  assert (
    float_bytes['parameter_bytes'] == float_bytes['float32_parameter_bytes'] == int8_bytes['float32_parameter_bytes']
  )
  assert int8_bytes['parameter_bytes'] < 0.3 * float_bytes['parameter_bytes']


@pytest.mark.parametrize('stem, classifier', [(True, True), (False, False)])
def test_ptq_serves_int8_kernels_with_a_scale_per_output_channel(float_run, stem, classifier):
  workdir, _ = float_run
  float_model = resnet_flax.load(str(workdir))
  model = resnet_flax.load(
    str(workdir), config=smoke_config(**{'quantize.stem': stem, 'quantize.classifier': classifier}), quantize='ptq'
  )
  assert (float_model.quantization, model.quantization) == ('none', 'ptq')
  weights = leaves(jax.device_get(float_model.restored.variables['params']))
  served = flax.traverse_util.flatten_dict(jax.device_get(model.restored.variables['params']), sep='/')
  assert served.keys() == weights.keys()
  expected_bytes = 4 * sum(x.size for x in jax.tree.leaves(float_model.restored.variables['batch_stats']))
  float_kernels = {'stem_conv/kernel': not stem, 'Dense_0/kernel': not classifier}
  for path, weight in weights.items():
    value = served[path]
    if not path.endswith('kernel') or float_kernels.get(path, False):
      assert value.dtype == np.float32, path
      np.testing.assert_array_equal(value, weight, err_msg=path)
      expected_bytes += 4 * weight.size
      continue
    qvalue, scale = value.array.qvalue, value.array.scale
    assert qvalue.dtype == np.int8 and scale.dtype == np.float32, path
    assert scale.shape == (1,) * (weight.ndim - 1) + weight.shape[-1:], path  # One per output channel.
    extremes = np.abs(qvalue.astype(np.int32)).max(axis=tuple(range(weight.ndim - 1)))
    assert np.all((extremes == 127) | (extremes == 128)), path  # Each channel's absmax uses the whole range.
    assert np.all(np.abs(qvalue * scale - weight) <= scale / 2 * (1 + 1e-4)), path  # Rounded to the nearest.
    expected_bytes += qvalue.size + 4 * scale.size
  assert model.parameter_bytes == expected_bytes
  assert float_model.parameter_bytes == 4 * sum(x.size for x in jax.tree.leaves(float_model.restored.variables))


# QAT.


def test_qat_records_its_recipe_and_resumes_bitwise(qat_run, tmp_path):
  assert json.loads((qat_run / 'run.json').read_text())['quantize'] == {'mode': 'qat', 'stem': True, 'classifier': True}
  assert finished_steps(qat_run) == [5, QAT_STEPS]
  resumed = tmp_path / 'resumed'
  shutil.copytree(qat_run, resumed)
  shutil.rmtree(resumed / 'checkpoints' / str(QAT_STEPS))
  trainer.train_and_evaluate(qat_config(qat_run.parent / 'never_read'), str(resumed))  # init_from is not applied again.
  straight, again = load_checkpoint(qat_run, QAT_STEPS), load_checkpoint(resumed, QAT_STEPS)
  for name in ('params', 'batch_stats', 'opt_state', 'step'):
    jax.tree.map(np.testing.assert_array_equal, again[name], straight[name])


def test_a_qat_run_evaluates_in_int8_exactly_as_training_evaluated_it(qat_run):
  results = evaluate.evaluate_checkpoint(smoke_config(), str(qat_run))  # quantize.mode=none: as trained.
  assert report_dirs(qat_run) == [report_dir(qat_run, 'int8-qat').name]
  assert results['quantize']['mode'] == 'qat' and results['quantize']['float_layers'] == []
  assert len(results['quantize']['int8_layers']) == 10  # 7 convolutions, 2 shortcuts, the classifier.
  scalars = writers.read_scalars(str(qat_run))
  (step, accuracy), (_, loss) = scalars['eval_accuracy'][-1], scalars['eval_loss'][-1]
  assert step == results['checkpoint_step'] == QAT_STEPS
  assert results['accuracy'] == pytest.approx(accuracy, abs=1e-6)
  assert results['loss'] == pytest.approx(loss, rel=1e-5)  # The float model's differs (the fake quantization).
  assert resnet_flax.load(str(qat_run)).quantization == 'qat'


# Refusals, each one line.


@pytest.mark.parametrize(
  'fields, message',
  [
    ({'quantize.mode': 'int4'}, r"--config.quantize.mode='int4' is invalid: choose one of none, ptq, qat"),
    ({'quantize.classifier': False}, r'quantize.classifier=False does nothing with quantize.mode=none'),
  ],
)
def test_bad_values_are_refused(fields, message):
  with pytest.raises(ConfigError, match=message) as error:
    config_checks.validate(smoke_config(**fields))
  assert '\n' not in str(error.value)


def test_ptq_is_not_a_training_mode(straight_run, tmp_path):
  with pytest.raises(ConfigError, match=r'quantize.mode=ptq quantizes a trained run when it is evaluated') as error:
    trainer.train_and_evaluate(smoke_config(**{'quantize.mode': 'ptq', 'num_epochs': 1.0}), str(tmp_path))
  assert '\n' not in str(error.value) and not any(tmp_path.iterdir())


@pytest.mark.parametrize(
  'run, fields, message',
  [
    ('float', {'quantize.mode': 'qat'}, r'trained without quantization-aware training; evaluate it in int8 with'),
    ('qat', {'quantize.mode': 'ptq', 'quantize.stem': False}, r'is served as it was trained: leave those fields'),
  ],
)
def test_serving_other_than_trained_is_refused(float_run, qat_run, run, fields, message):
  workdir = {'float': float_run[0], 'qat': qat_run}[run]
  with pytest.raises(ConfigError, match=message) as error:
    resnet_flax.load(str(workdir), config=smoke_config(**fields))
  assert '\n' not in str(error.value)


@pytest.mark.parametrize('fields', [{'quantize.mode': 'none'}, {'quantize.classifier': False}])
def test_a_resume_with_another_quantization_is_refused(qat_run, fields):
  config = qat_config(qat_run.parent, **fields)
  with pytest.raises(ConfigError, match=r'holds checkpoints of another model, .*\(quantize: ') as error:
    trainer.train_and_evaluate(config, str(qat_run))
  assert '\n' not in str(error.value)


def test_the_stem_and_classifier_names_are_the_models():
  variables = models.init_variables(models.create_model('resnet_tiny', 10, stem='whiten'), (32, 32, 3))
  recipe = quantize.Recipe('ptq', stem=False, classifier=False)
  assert set(recipe.float_layers) <= set(variables['params'])


# End to end.


@pytest.mark.slow
def test_the_command_line_trains_qat_and_serves_int8(straight_run, tmp_path):
  """main.py: a QAT fine-tune, evaluated and predicting in int8 as it is; PTQ of a float run on request;
  a QAT evaluation of a float run refused in one line, last."""
  qat, float_copy, image = tmp_path / 'qat', tmp_path / 'float', tmp_path / 'image.png'
  returncode, output = run_main(
    qat, '--config.num_epochs=1', f'--config.init_from={straight_run}', '--config.quantize.mode=qat'
  )
  assert returncode == 0, output
  returncode, output = run_main(qat, '--mode=evaluate')
  assert returncode == 0 and 'Serving in int8 (qat)' in output, output
  assert json.loads((report_dir(qat, 'int8-qat') / 'report.json').read_text())['quantize']['mode'] == 'qat'
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), np.uint8)).save(image)
  returncode, output = run_main(qat, '--mode=predict', f'--predict_paths={image}')
  assert returncode == 0 and 'Serving in int8 (qat)' in output, output
  assert len(json.loads((qat / 'predictions.json').read_text())['predictions']) == 1

  shutil.copytree(straight_run, float_copy, ignore=shutil.ignore_patterns('eval'))
  returncode, output = run_main(float_copy, '--mode=evaluate', '--config.quantize.mode=ptq')
  assert returncode == 0, output
  assert report_dirs(float_copy) == [report_dir(float_copy, 'int8-ptq').name]  # No float report.
  assert (report_dir(float_copy, 'int8-ptq') / 'report.json').is_file()
  returncode, output = run_main(float_copy, '--mode=evaluate', '--config.quantize.mode=qat')
  assert returncode == 1
  assert output.strip().splitlines()[-1].startswith('error: --config.quantize.mode=qat: the run was trained without')
