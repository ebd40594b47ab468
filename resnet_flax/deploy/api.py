"""The Python API: `resnet_flax.load(workdir)` hands back a trained model that takes any image.

    import resnet_flax

    model = resnet_flax.load('runs/r34')
    probabilities = model.predict(['cat.jpg', 'dog.png'], tta='flip')  # [2, num_classes]
    print(model.predict_classes('photos/'))  # Every image under a folder.
    explanation = model.explain('cat.jpg')  # Grad-CAM and integrated gradients (`resnet_flax.explain`).

Images are file paths, folders, encoded bytes, PIL images or uint8 arrays ([H, W, 3], [H, W] or a
batch [N, H, W, 3]) of any size: each is decoded, turned upright, made RGB and resized by the run's
recorded policy (`images.load_image`), then normalised as in training. It runs the weights evaluation
uses (the EMA when training kept one) through the same compiled forward pass as `--mode=evaluate`,
which is how `--mode=predict` runs too. `resnet_flax.load(workdir, quantize='ptq')` serves a float
run in int8; a run trained with `quantize.mode=qat` always serves in int8 (see `quantize`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh
from PIL import Image

from resnet_flax.compress import quantize as quantization  # `load` takes an argument named quantize.
from resnet_flax.data import DataError, ImageData, augment, folder, images
from resnet_flax.evaluate import inference, metrics
from resnet_flax.explain import methods
from resnet_flax.models import trained
from resnet_flax.run import distributed

MAX_BATCH = 256  # Inputs go through in batches of a power of two up to this: few shapes, few compilations.

ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray


@dataclasses.dataclass
class Model:
  """A trained run's model, ready to classify images (see the module docstring)."""

  restored: trained.Restored
  mesh: Mesh
  _compiled: dict[str, Callable] = dataclasses.field(default_factory=dict, repr=False)

  @property
  def class_names(self) -> tuple[str, ...]:
    return self.restored.run.info.class_names

  @property
  def image_size(self) -> tuple[int, int]:
    """(height, width) of the model's input; any image is resized to it by `resize_policy`."""
    height, width, _ = self.restored.run.info.image_shape
    return height, width

  @property
  def resize_policy(self) -> str:
    return self.restored.run.info.resize

  @property
  def step(self) -> int:
    """The training step of the checkpoint the weights come from."""
    return self.restored.step

  @property
  def quantization(self) -> str:
    """How the model serves: none (float32) | ptq | qat (int8 weights and activations; `quantize`)."""
    return 'none' if self.restored.quantized is None else self.restored.quantized.mode

  @property
  def parameter_bytes(self) -> int:
    """Bytes of the arrays the model serves with: weights (int8 and their scales where quantized),
    biases, BatchNorm parameters and statistics."""
    return quantization.served_bytes(self.restored.variables)

  def pixels(self, inputs: ImageInput | Sequence[ImageInput]) -> np.ndarray:
    """uint8 [N, H, W, 3]: `inputs` as the model sees them, before normalisation."""
    return np.stack([self._load(item) for item in _flatten(inputs)])

  def predict(self, inputs: ImageInput | Sequence[ImageInput], tta: str = 'none') -> np.ndarray:
    """Class probabilities [N, num_classes] of each image; `tta` as `eval.tta` (none | flip | flip+translate)."""
    if tta not in augment.TTA_VIEWS:
      raise ValueError(f'tta={tta!r}: choose one of {", ".join(augment.TTA_VIEWS)}')
    pixels = self.pixels(inputs)
    split = ImageData(pixels, np.zeros(len(pixels), np.int32), self.class_names)
    if tta not in self._compiled:
      self._compiled[tta] = inference.compile_forward(self.restored, tta, self.mesh)
    outputs = inference.forward(self.restored, split, _batch_size(len(pixels)), tta, self.mesh, self._compiled[tta])
    if 'tta_probabilities' in outputs:
      return outputs['tta_probabilities']
    return np.exp(metrics.log_softmax(outputs['logits'])).astype(np.float32)

  def predict_classes(self, inputs: ImageInput | Sequence[ImageInput], tta: str = 'none') -> list[str]:
    """The most probable class name of each image."""
    return [self.class_names[i] for i in self.predict(inputs, tta).argmax(axis=1)]

  def explain(
    self,
    inputs: ImageInput | Sequence[ImageInput],
    classes: int | str | Sequence[int | str] | None = None,
    steps: int | None = None,
    baseline: float = 0.0,
  ) -> methods.Explanation:
    """Grad-CAM and integrated gradients of each image for `classes`: None (each image's predicted class),
    one class index or name for all, or one per image. Integrated gradients start from a uniform image
    of `baseline` in [0, 1] (0: black) and take `steps` nodes (None: as many as a 1% completeness error
    needs, see `methods.Explainer`). Returns a `methods.Explanation`."""
    pixels = self.pixels(inputs)
    if 'explain' not in self._compiled:
      self._compiled['explain'] = methods.compile_explain(self.restored)
    indices = methods.class_indices(classes, self.class_names, len(pixels))
    return self._compiled['explain'](pixels, indices, steps, baseline)

  def _load(self, item: ImageInput) -> np.ndarray:
    if isinstance(item, Image.Image):
      item = np.asarray(item)
    if isinstance(item, np.ndarray):
      return images.to_model_input(item, self.image_size, self.resize_policy)
    return images.load_image(item, self.image_size, self.resize_policy)


def _flatten(inputs: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
  """One list of single images from an image, a batch array, or a sequence of images, paths and folders."""
  if isinstance(inputs, np.ndarray) and inputs.ndim == 4:
    return list(inputs)
  if isinstance(inputs, (str, os.PathLike, bytes, Image.Image, np.ndarray)):
    inputs = [inputs]
  flat = [image for item in inputs for image in folder.expand_folder(item)]
  if not flat:
    raise DataError('no images given: pass paths, folders, PIL images or uint8 arrays')
  return flat


def _batch_size(num_images: int) -> int:
  """The smallest power of two (at least the device count) that holds `num_images`, up to MAX_BATCH."""
  devices = jax.device_count()
  size = max(devices, 1 << max(num_images - 1, 0).bit_length())
  return min(size, max(MAX_BATCH, devices)) // devices * devices


def load(
  workdir: str,
  checkpoint: str | int = 'best',
  config: ml_collections.ConfigDict | None = None,
  quantize: str | None = None,
) -> Model:
  """The model of the trained run in `workdir`, at checkpoint 'best' (by validation accuracy; the
  final one where the run had no validation split), 'latest' or a step number. `quantize='ptq'`
  serves it in int8 (a QAT run always is); None takes `config.quantize.mode`."""
  from configs import default  # The fields a run's config.json may predate.

  config = config or default.get_config()
  quantize_config = ml_collections.ConfigDict(config.quantize.to_dict())  # A copy: the caller's stays as it is.
  quantize_config.mode = quantize or quantize_config.mode
  mesh = distributed.create_mesh()
  return Model(
    quantization.serve(trained.restore_workdir(workdir, config, str(checkpoint), mesh), quantize_config), mesh
  )
