"""The export formats: how each is written from a trained model, and run through its own runtime (`FORMATS`).

Every artifact takes uint8 RGB images [N, H, W, 3] at the model's size (`model_card.json` names the
size and the resize policy that makes any image fit) and returns float32 class probabilities
[N, classes]: normalisation and softmax are inside, and so are the weights (the EMA where training
kept one), computing in float32 whatever `model.dtype` training used. In `<workdir>/export/`
(`--mode=export`, `deploy.export`):

| format | file | made by | runs with |
| --- | --- | --- | --- |
| `jax` | `model.jaxexport` | `jax.export`, symbolic batch | `jax.export.deserialize(data).call(images)` |
| `saved_model` | `saved_model/` | jax2tf, batch `None` | TensorFlow: `serving_default`, `images` -> `probabilities` |
| `tflite` | `model_float32.tflite` | TFLite converter | LiteRT (`ai_edge_litert`) |
| `tflite_int8` | `model_int8.tflite` | TFLite converter, full-integer PTQ | LiteRT |
| `onnx` | `model.onnx` | tf2onnx from the `tflite` model | onnxruntime |

Choices, measured on resnet_tiny (jax 0.10, TF 2.21, LiteRT 2.3, tf2onnx 1.17, onnxruntime 1.32; 2 CPU
cores; latencies are medians for one image):

- The SavedModel comes from `jax.experimental.jax2tf`, not orbax-export: orbax-export wraps the same
  conversion and adds a dependency, and the pre- and post-processing it offers is JAX code here anyway.
  jax2tf now only serializes natively (an `XlaCallModule` op holding StableHLO). It and the `jax`
  artifact are lowered for CPU, CUDA and TPU (`PLATFORMS`; only CPU is tested here) and need nothing
  of this package.
- TFLite's converter turns that StableHLO into TFLite ops. It converts a batch-1 function, whose
  BatchNorms it folds into the convolutions, and the interpreter resizes the batch when it runs. With
  a symbolic batch every BatchNorm stays SUB/MUL/ADD behind BROADCAST_TO ops that XNNPack does not
  take: float 1.8 ms instead of 0.28 ms, int8 4.0 ms instead of 0.09 ms, and int8 further from
  float. Only a graph that fails at batch 1 or fixes it (squeeze-excitation gates) is converted so.
- `tflite_int8` is full-integer post-training quantization: int8 weights (per channel) and
  activations, integer ops only, the softmax dequantized to float32 at the end; its ranges are
  calibrated on `export.CALIBRATION_IMAGES` training images. The converter takes float pixel values
  and makes the input uint8 with scale 1 and zero point 0, so raw pixels go in (a uint8 input cast to
  float inside would leave a float CAST op in the graph); `export.calibration_images` makes the
  calibration span 0..255, which gives that scale. int8 is not faster on every CPU (model-optimization#599).
- ONNX: tf2onnx from the float32 TFLite model, its batch made symbolic: 27 nodes (BatchNorm folded
  into Conv), 0.26 ms, within 1e-6 of JAX. tf2onnx cannot read the SavedModel (no handler for
  `XlaCallModule`); from a TFLite model with a symbolic batch it makes 183 nodes (ScatterND,
  Unique, ...) running 2x slower. jax2onnx 0.17 makes 67 nodes (BatchNormalization unfolded), as
  fast (0.29 ms vs 0.33 ms side by side) and as close to JAX, but pins orbax-checkpoint < 0.11.37,
  older than training needs, and takes 15 s to convert instead of 1 s.
- A model qwix serves in int8 (`quantize`: PTQ asked for, or a QAT run) exports as `jax` and
  `saved_model` only: TFLite's converter cannot read qwix's int8 operations. The float run's
  `tflite_int8` is its int8 form for TFLite and ONNX runtimes.

`export_artifact`, `load_artifact` and `artifact_bytes` are what `--mode=export` and a benchmark need:
one format to a path, a uniform `predict(images) -> probabilities` per runtime, the size on disk.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging as std_logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from resnet_flax import models
from resnet_flax.deploy import api

INPUT, OUTPUT = 'images', 'probabilities'  # Names of the input and the output where a format names them.
PLATFORMS = ('cpu', 'cuda', 'tpu')  # What the `jax` and `saved_model` artifacts are lowered for.
ONNX_OPSET = 17

Predict = Callable[[np.ndarray], np.ndarray]  # uint8 [N, H, W, 3] -> float32 probabilities [N, classes].


# The serving function, in JAX.


def serving_function(model: api.Model) -> Callable[[jax.Array], jax.Array]:
  """Pixel values [N, H, W, 3] (uint8, or float in 0..255) -> float32 probabilities, weights inside."""
  restored = model.restored  # A model qwix serves in int8 stays as it is; float ones compute in float32.
  network = restored.model if restored.quantized else restored.model.clone(dtype=jnp.float32)
  variables = jax.device_get(restored.variables)
  mean, std = restored.run.info.pixel_mean, restored.run.info.pixel_std

  def probabilities(images: jax.Array) -> jax.Array:
    logits = models.apply_to_pixels(network.apply, variables, images, mean, std)
    return jax.nn.softmax(logits.astype(jnp.float32))

  return probabilities


# One format to a path.


def export_jax(model: api.Model, path: str) -> None:
  """Serialized `jax.export.Exported`: StableHLO with a symbolic batch dimension."""
  height, width = model.image_size
  (batch,) = jax.export.symbolic_shape('batch')
  images = jax.ShapeDtypeStruct((batch, height, width, 3), jnp.uint8)
  exported = jax.export.export(jax.jit(serving_function(model)), platforms=PLATFORMS)(images)
  with open(path, 'wb') as f:
    f.write(exported.serialize())


def _tf_function(model: api.Model, batch: int | None, dtype: Any, platforms: Sequence[str]):
  """A tf.function of `serving_function` for [batch (None: any), H, W, 3] `dtype` images."""
  import tensorflow as tf
  from jax.experimental import jax2tf

  height, width = model.image_size
  converted = jax2tf.convert(
    serving_function(model),
    polymorphic_shapes=['(batch, ...)' if batch is None else None],
    with_gradient=False,
    native_serialization_platforms=platforms,
  )
  signature = [tf.TensorSpec((batch, height, width, 3), dtype, name=INPUT)]
  return tf.function(lambda images: {OUTPUT: converted(images)}, input_signature=signature, autograph=False)


def export_saved_model(model: api.Model, path: str) -> None:
  """A TF SavedModel (a directory) whose `serving_default` signature maps `images` to `probabilities`."""
  import tensorflow as tf

  module = tf.Module()
  module.serve = _tf_function(model, None, tf.uint8, PLATFORMS)
  absl_logger = std_logging.getLogger('absl')
  level = absl_logger.level
  try:
    tf.saved_model.save(module, path, signatures={'serving_default': module.serve})
  finally:
    absl_logger.setLevel(level)  # TensorFlow's save sets it to WARNING: the rest of the process would log no INFO.


def _tflite(model: api.Model, calibration: np.ndarray | None = None) -> bytes:
  """A float32 TFLite model or, with `calibration` images, a full-integer int8 one; uint8 images in.

  Converted at batch 1, where the converter folds BatchNorm into the convolutions, unless the result
  then fails to convert or cannot take another batch size (a reshape with batch 1 baked in, as
  squeeze-excitation gates make): then with a symbolic batch, which is correct but slower (6x in
  float32, 44x in int8 on resnet_tiny: see the module docstring).
  """
  from tensorflow.lite.python.convert_phase import ConverterError  # Not in tf.lite's public names.

  try:
    content = _tflite_converter(model, 1, calibration).convert()
    if _same_at_any_batch(content, model.image_size):
      return content
    problem = 'batch 1 is baked into its graph'
  except ConverterError as e:
    problem = f'converting at batch 1 failed ({str(e).split("error: ")[-1].splitlines()[0]})'
  logging.warning('TFLite: %s; converting with a symbolic batch instead (slower)', problem)
  return _tflite_converter(model, None, calibration).convert()


def _tflite_converter(model: api.Model, batch: int | None, calibration: np.ndarray | None):
  """The TFLite converter of `serving_function` at `batch`; with `calibration`, for full-integer int8."""
  import tensorflow as tf

  module = tf.Module()
  module.serve = _tf_function(model, batch, tf.uint8 if calibration is None else tf.float32, ('cpu',))
  converter = tf.lite.TFLiteConverter.from_concrete_functions([module.serve.get_concrete_function()], module)
  if calibration is not None:  # Float pixel values in, made uint8 with scale 1 (module docstring).
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([image[None].astype(np.float32)] for image in calibration)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
  return converter


def _same_at_any_batch(content: bytes, image_size: tuple[int, int]) -> bool:
  """Whether a TFLite model gives two images at once what it gives each alone."""
  images = np.random.default_rng(0).integers(0, 256, (2, *image_size, 3), np.uint8)
  predict = _tflite_predictor(_tflite_interpreter(model_content=content))
  try:
    together = predict(images)
  except RuntimeError:  # The interpreter cannot resize the graph.
    return False
  return np.allclose(together, np.concatenate([predict(images[:1]), predict(images[1:])]), atol=1e-6)


def export_tflite(model: api.Model, path: str) -> None:
  """A float32 TFLite model taking uint8 images."""
  with open(path, 'wb') as f:
    f.write(_tflite(model))


def export_tflite_int8(model: api.Model, path: str, calibration: np.ndarray) -> None:
  """A full-integer TFLite model (int8 inside, uint8 input, float32 probabilities out), its activation
  ranges calibrated on `calibration` (uint8 [N, H, W, 3] training images, see `export.calibration_images`)."""
  with warnings.catch_warnings():  # The input's statistics come from calibration, as intended.
    warnings.filterwarnings('ignore', message='Statistics for quantized inputs were expected')
    content = _tflite(model, calibration)
  scale, zero_point = _tflite_interpreter(model_content=content).get_input_details()[0]['quantization']
  if (scale, zero_point) != (1.0, 0):  # Raw pixels in: what calibration_images' full 0..255 range gives.
    raise RuntimeError(f'the int8 input is quantized with scale {scale}, zero point {zero_point}, not 1 and 0')
  with open(path, 'wb') as f:
    f.write(content)


def export_onnx(model: api.Model, path: str) -> None:
  """ONNX (opset `ONNX_OPSET`) converted by tf2onnx from the float32 TFLite model, batch made symbolic."""
  import onnx
  import tf2onnx

  with tempfile.TemporaryDirectory() as directory:
    tflite_path = os.path.join(directory, 'model.tflite')
    export_tflite(model, tflite_path)
    with warnings.catch_warnings():  # tf2onnx reads the model with tf.lite.Interpreter, deprecated for LiteRT.
      warnings.filterwarnings('ignore', message='.*tf.lite.Interpreter is deprecated')
      proto, _ = tf2onnx.convert.from_tflite(tflite_path, opset=ONNX_OPSET)
  graph = proto.graph
  for value, name in ((graph.input[0], INPUT), (graph.output[0], OUTPUT)):
    _rename(graph, value.name, name)
    value.type.tensor_type.shape.dim[0].dim_param = 'batch'  # Was 1: no node depends on it (tests check N > 1).
  del graph.value_info[:]  # Intermediate shapes recorded for batch 1.
  onnx.checker.check_model(proto, full_check=True)
  onnx.save(proto, path)


def _rename(graph, old: str, new: str) -> None:
  """Renames the value `old` of an ONNX graph (its inputs, outputs and every node's references)."""
  for node in graph.node:
    node.input[:] = [new if name == old else name for name in node.input]
    node.output[:] = [new if name == old else name for name in node.output]
  for value in (*graph.input, *graph.output):
    if value.name == old:
      value.name = new


# Running an artifact.


def load_jax(path: str) -> Predict:
  with open(path, 'rb') as f:
    call = jax.jit(jax.export.deserialize(bytearray(f.read())).call)
  return lambda images: np.asarray(call(images))


def load_saved_model(path: str) -> Predict:
  import tensorflow as tf

  serve = tf.saved_model.load(path).signatures['serving_default']
  return lambda images: serve(**{INPUT: tf.constant(images)})[OUTPUT].numpy()


def _tflite_interpreter(**source):
  from ai_edge_litert.interpreter import Interpreter

  return Interpreter(**source)


def load_tflite(path: str) -> Predict:
  return _tflite_predictor(_tflite_interpreter(model_path=path))


def _tflite_predictor(interpreter) -> Predict:
  """Runs a LiteRT interpreter, resizing its input when the batch size changes (not on every call)."""
  interpreter.allocate_tensors()
  (input_details,), (output_details,) = interpreter.get_input_details(), interpreter.get_output_details()

  def predict(images: np.ndarray) -> np.ndarray:
    if tuple(interpreter.get_input_details()[0]['shape']) != images.shape:
      interpreter.resize_tensor_input(input_details['index'], images.shape, strict=False)
      interpreter.allocate_tensors()
    interpreter.set_tensor(input_details['index'], np.ascontiguousarray(images, np.uint8))
    interpreter.invoke()
    return interpreter.get_tensor(output_details['index'])

  return predict


def load_onnx(path: str) -> Predict:
  import onnxruntime

  session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
  return lambda images: session.run([OUTPUT], {INPUT: np.asarray(images, np.uint8)})[0]


# The formats.


@dataclasses.dataclass(frozen=True)
class Format:
  path: str  # Under the export directory.
  modules: tuple[str, ...]  # Python modules it needs, to export and to run (TensorFlow and the `export` extra's).
  export: Callable[..., None]  # (model, path) or, `calibrated`, (model, path, calibration images).
  load: Callable[[str], Predict]
  runtime: str
  calibrated: bool = False  # Its export takes calibration images.
  through_tflite: bool = True  # Made by TFLite's converter, which cannot read a model quantized by qwix.


TFLITE_MODULES = ('tensorflow', 'ai_edge_litert')
FORMATS = {
  'jax': Format('model.jaxexport', (), export_jax, load_jax, 'jax.export.deserialize(...).call', through_tflite=False),
  'saved_model': Format(
    'saved_model', ('tensorflow',), export_saved_model, load_saved_model, 'tensorflow', through_tflite=False
  ),
  'tflite': Format('model_float32.tflite', TFLITE_MODULES, export_tflite, load_tflite, 'ai_edge_litert'),
  'tflite_int8': Format('model_int8.tflite', TFLITE_MODULES, export_tflite_int8, load_tflite, 'ai_edge_litert', True),
  'onnx': Format(
    'model.onnx', (*TFLITE_MODULES, 'tf2onnx', 'onnx', 'onnxruntime'), export_onnx, load_onnx, 'onnxruntime'
  ),
}


def export_artifact(model: api.Model, name: str, path: str, calibration: np.ndarray | None = None) -> None:
  """Writes format `name` of `model` to `path`; `tflite_int8` needs `calibration` (`export.calibration_images`)."""
  export_format = FORMATS[name]
  if os.path.isdir(path):
    shutil.rmtree(path)  # A SavedModel directory: no file of an older export stays.
  if export_format.calibrated:
    if calibration is None:
      raise ValueError(f'{name} needs calibration images (export.calibration_images)')
    export_format.export(model, path, calibration)
  else:
    export_format.export(model, path)


def load_artifact(name: str, path: str) -> Predict:
  """`predict(images)`: uint8 [N, H, W, 3] -> float32 probabilities [N, classes], through format `name`'s runtime."""
  return FORMATS[name].load(path)


def artifact_bytes(path: str) -> int:
  """The size of a file, or of every file under a directory."""
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def missing_modules(name: str) -> list[str]:
  """The Python modules format `name` needs that cannot be imported."""
  missing = []
  for module in FORMATS[name].modules:
    try:
      importlib.import_module(module)
    except ImportError:
      missing.append(module)
  return missing
