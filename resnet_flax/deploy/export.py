"""`--mode=export`: a trained run as files that other runtimes serve, each scored through its runtime.

The formats, their files in `<workdir>/export/`, what makes them, what runs them and why each converter
was chosen: `deploy.formats`. This command chooses the formats, writes them, scores each on the test
split and writes `model_card.json` beside them.

LiteRT, tf2onnx, onnx and onnxruntime (and TensorFlow, a base dependency) come with
`pip install -e '.[export]'`: without one, the formats that need it are skipped in one log line,
unless asked for by name (a one-line error then). `model_card.json` records the classes, the input,
the checkpoint, each artifact's size and its test accuracy through its own runtime (with its top-1
agreement with the JAX model), the library versions and the command.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from resnet_flax import data
from resnet_flax.deploy import api
from resnet_flax.deploy import formats as artifact_formats  # `formats` is run_export's argument.
from resnet_flax.errors import ConfigError
from resnet_flax.evaluate import inference
from resnet_flax.train import config_checks

EXPORT_DIR = 'export'
MODEL_CARD = 'model_card.json'
EXTRA = "pip install -e '.[export]'"
CALIBRATION_IMAGES = 500  # Training images that calibrate the int8 activation ranges.
QWIX_IS_NOT_CONVERTIBLE = (
  "TFLite's converter cannot read the model qwix serves in int8 (quantize.mode=ptq, or a run trained with qat): "
  'export with --export_formats=jax,saved_model, or export the float run (tflite_int8 is its int8 form)'
)
VERSIONS_OF = ('resnet_flax', 'jax', 'jaxlib', 'flax', 'tensorflow', 'tensorflow-cpu', 'ai-edge-litert')
VERSIONS_OF += ('tf2onnx', 'onnx', 'onnxruntime')


def check_names(requested: Sequence[str]) -> None:
  unknown = [name for name in requested if name not in artifact_formats.FORMATS]
  if unknown:
    raise ConfigError(
      f'unknown --export_formats {", ".join(unknown)}: choose from {", ".join(artifact_formats.FORMATS)}'
    )


def choose_formats(requested: Sequence[str], quantization: str = 'none') -> list[str]:
  """The formats to export: `requested`, or (when empty) every one that can be, the others named in a log
  line per reason: packages not installed, or a model served in int8 by qwix (`quantization`, see
  `api.Model.quantization`), which TFLite's converter cannot read. Asking for such a format is a ConfigError."""
  check_names(requested)
  candidates = list(dict.fromkeys(requested)) or list(artifact_formats.FORMATS)
  missing = {name: artifact_formats.missing_modules(name) for name in candidates}
  unconvertible = [
    name for name in candidates if quantization != 'none' and artifact_formats.FORMATS[name].through_tflite
  ]
  if requested:
    for name in candidates:
      if missing[name]:
        raise ConfigError(f'--export_formats={name} needs {", ".join(missing[name])}, not installed: {EXTRA}')
    if unconvertible:
      raise ConfigError(f'--export_formats={unconvertible[0]}: {QWIX_IS_NOT_CONVERTIBLE}')
    return candidates
  skipped = [name for name in candidates if missing[name]]
  if skipped:
    modules = sorted({module for name in skipped for module in missing[name]})
    logging.warning('Not exporting %s: %s not installed (%s)', ', '.join(skipped), ', '.join(modules), EXTRA)
  skipped_too = [name for name in unconvertible if name not in skipped]
  if skipped_too:
    logging.warning('Not exporting %s: %s', ', '.join(skipped_too), QWIX_IS_NOT_CONVERTIBLE)
  return [name for name in candidates if name not in skipped + unconvertible]


# --mode=export.


def calibration_images(train: np.ndarray, count: int = CALIBRATION_IMAGES, seed: int = 0) -> np.ndarray:
  """`count` training images (a fixed choice for `seed`), one pixel of the first set to black and one to
  white, so that the int8 input's range is exactly 0..255 (raw pixels) whatever the data."""
  chosen = np.random.default_rng(seed).choice(len(train), min(count, len(train)), replace=False)
  images = train[np.sort(chosen)].copy()
  images[0, 0, 0], images[0, 0, -1] = 0, 255
  return images


def chosen_test_images(size: int, limit: int | None, seed: int = 0) -> np.ndarray:
  """Indices of the test images to evaluate: all (`limit` None) or a fixed random `limit` of them, in order."""
  if limit is None or limit >= size:
    return np.arange(size)
  return np.sort(np.random.default_rng(seed).choice(size, limit, replace=False))


def evaluate_artifacts(
  model: api.Model, predictors: dict[str, artifact_formats.Predict], split: data.ImageData, batch_size: int
) -> dict[str, Any]:
  """Test accuracy of the JAX model and of each artifact run by its own runtime, with the artifact's
  top-1 agreement with the JAX model and its largest probability difference from it."""
  targets = data.class_indices(split.class_names, model.class_names)[split.labels]
  batches = range(0, len(split), batch_size)
  reference = np.concatenate([model.predict(split.images[i : i + batch_size]) for i in batches])
  artifacts = {}
  for name, predict in predictors.items():
    probabilities = np.concatenate([predict(split.images[i : i + batch_size]) for i in batches])
    artifacts[name] = {
      'test_accuracy': float(np.mean(probabilities.argmax(1) == targets)),
      'top1_agreement_with_jax': float(np.mean(probabilities.argmax(1) == reference.argmax(1))),
      'max_abs_difference_from_jax': float(np.abs(probabilities - reference).max()),
    }
    logging.info(
      '%s: test accuracy %.4f; top-1 as the JAX model on %.2f%% of the images; probabilities within %.1e of it',
      name,
      artifacts[name]['test_accuracy'],
      100 * artifacts[name]['top1_agreement_with_jax'],
      artifacts[name]['max_abs_difference_from_jax'],
    )
  jax_accuracy = float(np.mean(reference.argmax(1) == targets))
  return {'num_examples': len(split), 'jax_accuracy': jax_accuracy, 'artifacts': artifacts}


def versions() -> dict[str, str]:
  found = {}
  for distribution in VERSIONS_OF:
    try:
      found[distribution] = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
      pass
  return found


def run_export(
  config: ml_collections.ConfigDict,
  workdir: str,
  formats: Sequence[str] = (),
  test_images: int | None = None,
  command: str | None = None,
) -> dict[str, Any]:
  """Exports checkpoint `config.eval.checkpoint` of `workdir` in `formats` (all installed when empty) to
  `<workdir>/export/`, evaluates each on `test_images` test images of `config.data` (None: all, 0: none),
  and writes the model card, with `command` (default: this process's) as what made them; returns it."""
  config_checks.validate(config)
  check_names(formats)
  model = api.load(workdir, config.eval.checkpoint, config)
  names = choose_formats(formats, model.quantization)
  calibration = None
  if any(artifact_formats.FORMATS[name].calibrated for name in names):
    train = data.load_splits(inference.resized_as_trained(config.data, model.restored.run.info))['train']
    calibration = calibration_images(train.images)
  split = None
  if test_images != 0:  # Loaded before anything is written: a data error leaves the last export as it was.
    split = inference.load_test_split(config.data, model.restored.run.info)
    subset = chosen_test_images(len(split), test_images)
    split = data.ImageData(split.images[subset], split.labels[subset], split.class_names)
  directory = os.path.join(workdir, EXPORT_DIR)
  card = model_card(model, workdir, config, export_all(model, names, directory, calibration), calibration, command)
  if split is not None:
    predictors = {
      name: artifact_formats.load_artifact(name, os.path.join(directory, artifact_formats.FORMATS[name].path))
      for name in names
    }
    results = evaluate_artifacts(model, predictors, split, config.eval_batch_size)
    for name, metrics in results.pop('artifacts').items():
      card['artifacts'][name].update(metrics)
    card['test'].update(results)
  with open(os.path.join(directory, MODEL_CARD), 'w') as f:
    json.dump(card, f, indent=2)
  logging.info('Model card: %s', os.path.join(directory, MODEL_CARD))
  return card


def export_all(
  model: api.Model, names: Sequence[str], directory: str, calibration: np.ndarray | None
) -> dict[str, dict[str, Any]]:
  """Writes formats `names` to `directory` and removes the other formats' artifacts (the model card
  describes what is there); returns each artifact's path, size and runtime."""
  os.makedirs(directory, exist_ok=True)
  artifacts = {}
  for name, export_format in artifact_formats.FORMATS.items():
    path = os.path.join(directory, export_format.path)
    if name not in names:
      _remove(path)
      continue
    start = time.perf_counter()
    artifact_formats.export_artifact(model, name, path, calibration)
    artifacts[name] = {
      'path': export_format.path,
      'bytes': artifact_formats.artifact_bytes(path),
      'runtime': export_format.runtime,
    }
    logging.info(
      'Exported %s in %.1f s: %s, %d bytes', name, time.perf_counter() - start, path, artifacts[name]['bytes']
    )
  return artifacts


def _remove(path: str) -> None:
  if os.path.isdir(path):
    shutil.rmtree(path)
  elif os.path.exists(path):
    os.remove(path)


def model_card(
  model: api.Model,
  workdir: str,
  config: ml_collections.ConfigDict,
  artifacts: dict[str, dict[str, Any]],
  calibration: np.ndarray | None,
  command: str | None,
) -> dict[str, Any]:
  """What a user of the artifacts needs to know; `run_export` adds the test results."""
  info = model.restored.run.info
  height, width = model.image_size
  return {
    'model': info.model_name,
    'class_names': list(model.class_names),
    'image_size': [height, width],
    'resize_policy': model.resize_policy,
    'input': f'uint8 RGB images [N, {height}, {width}, 3] (other sizes: resize by resize_policy first); '
    'normalised inside by pixel_mean and pixel_std',
    'output': 'float32 class probabilities [N, num_classes], in the order of class_names',
    'pixel_mean': list(info.pixel_mean),
    'pixel_std': list(info.pixel_std),
    'workdir': os.path.abspath(workdir),
    'checkpoint': str(config.eval.checkpoint),
    'checkpoint_step': model.step,
    'quantization': model.quantization,
    'artifacts': artifacts,
    'int8_calibration': None if calibration is None else {'split': 'train', 'num_images': len(calibration)},
    'test': {'data': {key: config.data[key] for key in ('source', 'name', 'path')}, 'num_examples': 0},
    'versions': versions(),
    'command': command or shlex.join(['python', *sys.argv]),
    'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
  }
