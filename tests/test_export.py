"""`--mode=export`: every format against the JAX model, the model card, missing packages, bad names.

One export of a copy of the shared smoke run (`straight_run`: resnet_tiny, 10 synthetic classes, 32x32
images) in every format (conftest's `exported`, which the server's tests share) serves the tests that read artifacts.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from configs import smoke
from resnet_flax import models
from resnet_flax.deploy import api, export, formats
from resnet_flax.errors import ConfigError, UserError
from resnet_flax.models import trained
from resnet_flax.run.distributed import create_mesh
from resnet_flax.run.workdir import RunInfo

from helpers import SMOKE_TOTAL_STEPS, run_main

FLOAT_FORMATS = ('jax', 'saved_model', 'tflite', 'onnx')


def artifact_path(workdir, name: str) -> str:
  return os.path.join(workdir, export.EXPORT_DIR, formats.FORMATS[name].path)


@pytest.mark.parametrize('name', list(formats.FORMATS))
def test_each_format_gives_the_jax_models_probabilities_at_two_batch_sizes(exported, name):
  workdir, _, model, images = exported
  predict = formats.load_artifact(name, artifact_path(workdir, name))
  tolerance = 0.02 if name == 'tflite_int8' else 1e-5
  for batch in (images[:1], images[1:6], images[:1]):  # Back to one image: the interpreter resizes again.
    probabilities, expected = predict(batch), model.predict(batch)
    assert probabilities.dtype == np.float32 and probabilities.shape == (len(batch), len(model.class_names))
    np.testing.assert_allclose(probabilities, expected, atol=tolerance)
    np.testing.assert_array_equal(probabilities.argmax(axis=1), expected.argmax(axis=1))


def test_the_jax_artifact_runs_without_resnet_flax(exported, tmp_path):
  workdir, _, model, images = exported
  np.save(tmp_path / 'images.npy', images[:3])
  script = textwrap.dedent(f"""
    import sys

    class Refuse:  # No module of this project may be imported.
      def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('resnet_flax', 'configs'):
          raise ImportError(name)

    sys.meta_path.insert(0, Refuse())
    import jax
    import numpy as np

    with open({artifact_path(workdir, 'jax')!r}, 'rb') as f:
      exported = jax.export.deserialize(bytearray(f.read()))
    images = np.load('images.npy')
    print(exported.in_avals[0].str_short())
    np.save('probabilities.npy', np.concatenate([exported.call(images), exported.call(images[:1])]))
    assert not any(name.startswith('resnet_flax') for name in sys.modules)
  """)
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ''}
  result = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == 'uint8[batch,32,32,3]'  # The batch size is symbolic.
  expected = model.predict(images[:3])
  np.testing.assert_allclose(
    np.load(tmp_path / 'probabilities.npy'), np.concatenate([expected, expected[:1]]), atol=1e-5
  )


def test_the_model_card(exported):
  workdir, card, model, images = exported
  with open(os.path.join(workdir, export.EXPORT_DIR, export.MODEL_CARD)) as f:
    assert json.load(f) == card
  assert card['class_names'] == [f'class_{i}' for i in range(10)] == list(model.class_names)
  assert card['image_size'] == [32, 32] and card['resize_policy'] == 'shorter_side_then_center_crop'
  assert card['checkpoint'] == 'best' and card['checkpoint_step'] == SMOKE_TOTAL_STEPS  # No validation: the last.
  assert card['command'] == 'the command' and card['int8_calibration'] == {'split': 'train', 'num_images': 500}
  assert {'jax', 'flax', 'tf2onnx', 'onnxruntime', 'ai-edge-litert'} <= set(card['versions'])
  assert card['test']['num_examples'] == len(images) == 200
  assert list(card['artifacts']) == list(formats.FORMATS)
  for name, artifact in card['artifacts'].items():
    assert artifact['bytes'] == formats.artifact_bytes(artifact_path(workdir, name)) > 0
    assert 0.9 <= artifact['test_accuracy'] <= 1  # The smoke run learns its synthetic classes.
    assert abs(artifact['test_accuracy'] - card['test']['jax_accuracy']) <= 0.01, name
  for name in FLOAT_FORMATS:
    assert card['artifacts'][name]['top1_agreement_with_jax'] == 1.0
    assert card['artifacts'][name]['max_abs_difference_from_jax'] < 1e-5
  assert card['artifacts']['tflite_int8']['bytes'] < 0.4 * card['artifacts']['tflite']['bytes']


def test_a_missing_package_skips_its_formats_in_one_line(exported, tmp_path, monkeypatch, caplog):
  workdir = tmp_path / 'run'
  shutil.copytree(exported[0], workdir)  # With the artifacts of every format.
  monkeypatch.setitem(sys.modules, 'tensorflow', None)  # Importing it fails.
  with caplog.at_level(logging.WARNING):
    card = export.run_export(smoke.get_config(), str(workdir), test_images=20)
  skipped = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.module == 'export']
  assert skipped == [
    "Not exporting saved_model, tflite, tflite_int8, onnx: tensorflow not installed (pip install -e '.[export]')"
  ]
  assert list(card['artifacts']) == ['jax'] and card['test']['num_examples'] == 20
  assert sorted(os.listdir(workdir / export.EXPORT_DIR)) == ['model.jaxexport', export.MODEL_CARD]  # Others gone.
  with pytest.raises(ConfigError) as error:
    export.choose_formats(['jax', 'tflite'])
  assert str(error.value) == "--export_formats=tflite needs tensorflow, not installed: pip install -e '.[export]'"


def test_a_model_qwix_serves_in_int8_exports_what_tflite_does_not_convert(caplog):
  with caplog.at_level(logging.WARNING):
    assert export.choose_formats([], quantization='ptq') == ['jax', 'saved_model']
  assert 'Not exporting tflite, tflite_int8, onnx: ' + export.QWIX_IS_NOT_CONVERTIBLE in caplog.text
  assert export.choose_formats(['saved_model', 'jax', 'jax'], quantization='qat') == ['saved_model', 'jax']
  with pytest.raises(ConfigError, match='^--export_formats=tflite_int8: TFLite'):
    export.choose_formats(['jax', 'tflite_int8'], quantization='ptq')


def test_an_unknown_format_is_one_line(tmp_path):
  returncode, output = run_main(tmp_path, '--mode=export', '--export_formats=jax,tflite8')
  assert returncode == 1
  assert output.strip().splitlines()[-1] == (
    'error: unknown --export_formats tflite8: choose from jax, saved_model, tflite, tflite_int8, onnx'
  )


def test_a_graph_that_fixes_batch_one_is_converted_with_a_symbolic_batch(tmp_path, caplog):
  """Squeeze-excitation gates do not convert at batch 1 (a Dense over [1, 1, 1, C]): the artifacts still
  take any batch size."""
  config = smoke.get_config()
  config.model.se_ratio = 0.25
  network = models.create_model_from_config(config, 10)
  variables = models.init_variables(network, (32, 32, 3), jax.random.key(0))
  info = RunInfo('resnet_tiny', 0.25, '', (32, 32, 3), tuple('abcdefghij'), (0.5,) * 3, (0.25,) * 3, 8)
  model = api.Model(trained.Restored(trained.TrainedRun(config, info), network, variables, 0), create_mesh())
  images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), np.uint8)
  for name in ('tflite', 'onnx'):
    with caplog.at_level(logging.WARNING):
      formats.export_artifact(model, name, str(tmp_path / name))
    np.testing.assert_allclose(
      formats.load_artifact(name, str(tmp_path / name))(images), model.predict(images), atol=1e-5
    )
  assert 'converting with a symbolic batch instead' in caplog.text


@pytest.mark.slow
def test_the_command_exports_every_format(straight_run, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(straight_run, workdir)
  returncode, output = run_main(workdir, '--mode=export', '--export_test_images=50')
  assert returncode == 0, output
  with open(workdir / export.EXPORT_DIR / export.MODEL_CARD) as f:
    card = json.load(f)
  assert list(card['artifacts']) == list(formats.FORMATS) and card['test']['num_examples'] == 50
  assert card['command'].startswith('python main.py --workdir=') and '--mode=export' in card['command']


def test_exporting_leaves_the_processes_log_level_as_it_was(exported, tmp_path):
  """TensorFlow's SavedModel writer sets absl's logger to WARNING: a process that exports and then
  trains (the Python API, these tests) would log no INFO line after it."""
  absl_logger = logging.getLogger('absl')
  absl_logger.setLevel(logging.INFO)
  formats.export_artifact(exported[2], 'saved_model', str(tmp_path / 'saved_model'))
  assert absl_logger.level == logging.INFO


def test_a_data_error_leaves_the_last_export_as_it_was(exported, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(exported[0], workdir)
  before = {path.name: path.read_bytes() for path in (workdir / export.EXPORT_DIR).iterdir() if path.is_file()}
  config = smoke.get_config()
  config.data.source, config.data.path = 'folder', str(tmp_path / 'nowhere')
  with pytest.raises(UserError):
    export.run_export(config, str(workdir), ['jax'])
  after = {path.name: path.read_bytes() for path in (workdir / export.EXPORT_DIR).iterdir() if path.is_file()}
  assert after == before
