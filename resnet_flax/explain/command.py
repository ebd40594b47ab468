"""`--mode=explain`: what a trained run bases its decisions on, as a grid of images and a JSON file.

`run_explain` writes `<workdir>/explain/explanations.png` (one row per image: the
image, Grad-CAM over it, integrated gradients) and `explanations.json`, for the images of
`--predict_paths` or for `--explain_per_class` test images of each class, half of them correctly
classified and half misclassified where the class has them. The maps, their integrated gradients'
adaptive steps and the randomisation sanity check are `resnet_flax.explain.methods`'; the Python API's
`Model.explain` returns the same `Explanation`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import textwrap
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from matplotlib.figure import Figure

from resnet_flax import data
from resnet_flax.deploy import api, predict
from resnet_flax.errors import ConfigError
from resnet_flax.evaluate import inference
from resnet_flax.explain import methods
from resnet_flax.train import config_checks

MAX_IMAGES = 200  # Rows of one grid: a taller PNG exceeds what image viewers (and Agg) handle.
OUTPUT_DIR = 'explain'
GRID_FILE = 'explanations.png'
JSON_FILE = 'explanations.json'
IG_DISPLAY_PERCENTILE = 99  # The IG colour scale ends at this percentile of |attribution|: outliers saturate.
TITLE_WIDTH = 110  # Characters per line of the grid's title.


@dataclasses.dataclass(frozen=True)
class Chosen:
  """The images `--mode=explain` explains, and what is known of them."""

  pixels: np.ndarray  # uint8 [N, H, W, 3], as the model sees them.
  sources: list[str]  # A path, or the image's index in the test split.
  true_classes: list[int | None]  # Model class indices; None where unknown.
  selection: str  # How they were chosen, for the JSON and the grid's title.


def choose_test_images(
  labels: np.ndarray, predictions: np.ndarray, per_class: int
) -> tuple[np.ndarray, dict[int, int]]:
  """Indices of `per_class` images of each class of `labels` (the first ones of the split, in order),
  half (rounded up) correctly classified and half misclassified; where a class has too few of one kind
  the other fills in. Also returns {class: misclassified images taken} of the classes short of them."""
  wanted_wrong = per_class // 2
  chosen, short = [], {}
  for label in np.unique(labels):
    of_class = np.flatnonzero(labels == label)
    right, wrong = of_class[predictions[of_class] == label], of_class[predictions[of_class] != label]
    num_right = min(len(right), per_class - min(len(wrong), wanted_wrong))
    num_wrong = min(len(wrong), per_class - num_right)
    chosen += [*right[:num_right], *wrong[:num_wrong]]
    if num_wrong < wanted_wrong:
      short[int(label)] = num_wrong
  return np.array(chosen, np.int64), short


def from_test_split(config: ml_collections.ConfigDict, model: api.Model, per_class: int) -> Chosen:
  """`choose_test_images` of the test split `config.data` selects, classified by `model`."""
  split = inference.load_test_split(config.data, model.restored.run.info)
  labels = data.class_indices(split.class_names, model.class_names)[split.labels]
  predictions = model.predict(split.images).argmax(axis=1)
  indices, short = choose_test_images(labels, predictions, per_class)
  selection = (
    f'{per_class} test images per class ({-(-per_class // 2)} correctly classified, {per_class // 2} '
    'misclassified where the class has them; the first ones of the test split)'
  )
  if short:
    selection += f'; fewer misclassified in {", ".join(f"{model.class_names[c]} ({n})" for c, n in short.items())}'
  sources = [f'test image {i}' for i in indices]
  return Chosen(model.pixels(split.images[indices]), sources, [int(c) for c in labels[indices]], selection)


def from_paths(model: api.Model, paths: Sequence[str]) -> Chosen:
  """The images of `paths` (files and folders); the true class of one in a folder named after a class is that."""
  files = predict.image_files(paths)
  folder_class = lambda path: os.path.basename(os.path.dirname(os.path.abspath(path)))
  true_classes = [data.class_index(folder_class(path), model.class_names) for path in files]
  selection = 'the images of --predict_paths; the true class is the name of the folder holding an image, if a class'
  return Chosen(model.pixels(files), files, true_classes, selection)


def image_records(
  chosen: Chosen, explanation: methods.Explanation, check: dict[str, Any], class_names: Sequence[str]
) -> list[dict[str, Any]]:
  """Per image, what the grid shows: classes, probability, correctness, completeness, the sanity check."""
  records = []
  for i, (source, true_class) in enumerate(zip(chosen.sources, chosen.true_classes, strict=True)):
    predicted = int(explanation.predicted[i])
    records.append(
      {
        'source': source,
        'true_class': None if true_class is None else class_names[true_class],
        'predicted_class': class_names[predicted],
        'probability': float(explanation.probabilities[i, predicted]),
        'correct': None if true_class is None else bool(true_class == predicted),
        'explained_class': class_names[int(explanation.classes[i])],
        'logit': float(explanation.logits[i]),
        'baseline_logit': float(explanation.baseline_logits[i]),
        'attribution_sum': float(explanation.attributions[i].astype(np.float64).sum()),
        'integrated_gradients_steps': int(explanation.steps[i]),
        'completeness_error': float(explanation.completeness_error[i]),
        'randomized_rank_correlation': {
          'grad_cam': _float_or_none(check['per_image_grad_cam'][i]),
          'integrated_gradients': _float_or_none(check['per_image_integrated_gradients'][i]),
        },
      }
    )
  return records


def _float_or_none(value: float) -> float | None:
  return None if np.isnan(value) else float(value)


def plot_explanations(results: dict[str, Any], explanation: methods.Explanation, path: str):
  """One row per image: the image, its Grad-CAM over it, its integrated gradients (red for, blue against)."""
  rows = len(explanation.pixels)
  figure = Figure(figsize=(7.5, 1.2 + 2.1 * rows), layout='constrained')
  axes = figure.subplots(rows, 3, squeeze=False)
  for row, record in enumerate(results['images']):
    image, cam, ig = explanation.pixels[row], explanation.grad_cam[row], explanation.integrated_gradients[row]
    verdict = {None: 'true class unknown', True: 'correct', False: 'misclassified'}[record['correct']]
    axes[row, 0].imshow(image)
    axes[row, 0].set_title(
      f'true {record["true_class"] or "?"}, predicted {record["predicted_class"]} '
      f'({record["probability"]:.0%})\n{verdict}',
      fontsize=7,
    )
    axes[row, 1].imshow(image)
    axes[row, 1].imshow(cam / cam.max() if cam.max() > 0 else cam, cmap='jet', alpha=0.5, vmin=0, vmax=1)
    axes[row, 1].set_title(f'Grad-CAM: {record["explained_class"]}', fontsize=7)
    limit = max(float(np.percentile(np.abs(ig), IG_DISPLAY_PERCENTILE)), 1e-12)
    axes[row, 2].imshow(ig, cmap='RdBu_r', vmin=-limit, vmax=limit)
    axes[row, 2].set_title(
      f'integrated gradients: {record["integrated_gradients_steps"]} steps,\n'
      f'completeness error {record["completeness_error"]:.2%}',
      fontsize=7,
    )
    for axis in axes[row]:
      axis.set_axis_off()
  check = results['sanity_check']
  title = [
    f'{os.path.basename(os.path.normpath(results["workdir"]))}, step {results["checkpoint_step"]}: '
    f'{results["selection"]}',
    'rank correlation with the maps after re-initialising the classifier and last stage: Grad-CAM '
    f'{_format(check["grad_cam_rank_correlation"])}, integrated gradients '
    f'{_format(check["integrated_gradients_rank_correlation"])}',
  ]
  figure.suptitle('\n'.join(line for text in title for line in textwrap.wrap(text, TITLE_WIDTH)), fontsize=8)
  figure.savefig(path, dpi=100)


def _format(value: float | None) -> str:
  return 'undefined' if value is None else f'{value:.2f}'


def run_explain(
  config: ml_collections.ConfigDict, workdir: str, paths: Sequence[str], per_class: int, steps: int | None = None
) -> dict[str, Any]:
  """Explains the images of `paths` (or `per_class` test images of each class), integrated gradients
  with `steps` nodes (None: adaptive, see `Explainer`): writes `<workdir>/explain/explanations.png` and
  `explanations.json`; returns the JSON's contents."""
  config_checks.validate(config)
  start = time.perf_counter()
  model = api.load(workdir, config.eval.checkpoint, config=config)
  explainer = methods.compile_explain(model.restored)
  chosen = from_paths(model, paths) if paths else from_test_split(config, model, per_class)
  if len(chosen.pixels) > MAX_IMAGES:
    raise ConfigError(
      f'{len(chosen.pixels)} images to explain, more than one grid shows ({MAX_IMAGES}): '
      'give fewer --predict_paths or a smaller --explain_per_class'
    )
  classes = methods.class_indices(None, model.class_names, len(chosen.pixels))
  explanation = explainer(chosen.pixels, classes, steps)
  check = methods.randomization_check(explainer, explanation, config.seed + 1)
  errors = explanation.completeness_error
  results = {
    'workdir': os.path.abspath(workdir),
    'checkpoint_step': model.step,
    'selection': chosen.selection,
    'integrated_gradients': {
      'steps': steps
      or f'{methods.IG_STEPS}, doubled where the completeness error exceeds {methods.IG_TOLERANCE:.0%}, '
      f'up to {methods.IG_MAX_STEPS}',
      'quadrature': 'Gauss-Legendre',
      'baseline': 'black image (pixel value 0)',
      'max_completeness_error': float(errors.max()),
      'median_completeness_error': float(np.median(errors)),
      'above_tolerance': int(np.sum(errors > methods.IG_TOLERANCE)),
    },
    'sanity_check': {k: v for k, v in check.items() if not k.startswith('per_image')},
    'seconds': round(time.perf_counter() - start, 1),
    'images': image_records(chosen, explanation, check, model.class_names),
  }
  if jax.process_index() == 0:
    directory = os.path.join(workdir, OUTPUT_DIR)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, JSON_FILE), 'w') as f:
      json.dump(results, f, indent=2)
    plot_explanations(results, explanation, os.path.join(directory, GRID_FILE))
    logging.info(
      'Explained %d images in %.0f s: integrated gradients (%d to %d steps) completeness error at most %.2f%%; '
      'rank correlation after re-initialising the classifier and last stage: Grad-CAM %s, integrated gradients %s; '
      'wrote %s',
      len(chosen.pixels),
      results['seconds'],
      explanation.steps.min(),
      explanation.steps.max(),
      100 * results['integrated_gradients']['max_completeness_error'],
      _format(check['grad_cam_rank_correlation']),
      _format(check['integrated_gradients_rank_correlation']),
      os.path.join(directory, GRID_FILE),
    )
  return results
