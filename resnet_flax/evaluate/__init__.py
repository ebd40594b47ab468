"""Evaluation of a workdir's checkpoints: restore the weights, one sharded forward pass, the metrics.

`evaluate_checkpoint` restores one checkpoint (best by validation accuracy, which is the final one
when the run had no validation split; latest; or a step), runs one jitted forward
pass sharded over the ('data',) mesh on every example of the test split exactly once (padded,
masked batches), and computes the report on the host in float64 numpy, so the same checkpoint
gives the identical report on any number of devices. It writes `<workdir>/eval/<name>/`:
`report.json`, `predictions.npz`, `confusion_matrix.png`, `per_class.png`; and
`<workdir>/training_curves.png` (see `report`). Any image is resized as the run's were (run.json).
A model served in int8 (`quantize`: PTQ on request, a QAT run always) reports in `<name>-int8-<mode>/`.
On request the report adds robustness: accuracy under adversarial attacks (`eval.attacks`, `attacks`;
plot `accuracy_vs_epsilon.png`) and on the CIFAR-10-C corruptions (`eval.corruptions`, `corruptions`;
heat map `corruptions.png`), both on a class-stratified subset of the test split that is the same in
every run (`data.stratified_subset`).

Classes are matched by name: the evaluated data may hold a subset or a reordering of the model's
classes. Predictions are over all the model's classes (predicting a class the data lacks is an
error). The confusion matrix counts images of `class_names[i]` (the data's classes, rows)
predicted as `predicted_class_names[j]` (the model's classes: the data's classes first, in the
same order, then those the data lacks), so its diagonal holds the correct predictions and its
trace / num_examples is the accuracy.

Precision, recall and F1 are per class of the data (the rows): for class i, precision =
matrix[i, i] / column i's sum, recall = matrix[i, i] / row i's sum, F1 = 2 matrix[i, i] / (column
sum + row sum), each 0.0 where its denominator is 0 (scikit-learn's default). A prediction of a class
the data lacks (a column after the rows) costs the true class recall but no class precision. The
macro averages are unweighted means over the data's classes, as scikit-learn's
`f1_score(y_true, y_pred, average='macro', labels=<the data's classes>)`.

Expected calibration error: the confidence of an image is its top softmax probability; images
fall into 15 equal-width confidence bins [0, 1/15), ..., [14/15, 1]; ECE is the image-weighted
mean over bins of |accuracy - mean confidence| (Guo et al., 2017).

Test-time augmentation (`eval.tta`) averages the softmax over views of each image: `flip` uses
the image and its mirror (2 views); `flip+translate` uses those two, each also shifted by one
pixel diagonally both ways with reflect padding (6 views, as airbench does, equally weighted).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from resnet_flax import data
from resnet_flax.compress import prune, quantize
from resnet_flax.data import ImageData, augment, input_pipeline
from resnet_flax.errors import ConfigError
from resnet_flax.evaluate import inference, metrics, report
from resnet_flax.models import trained
from resnet_flax.robust import attacks, corruptions
from resnet_flax.run import checkpoint, curves, distributed, report_paths
from resnet_flax.train import config_checks

PREDICTIONS_FILE = 'predictions.npz'
ATTACK_SEED = 0  # Which test images are attacked, and their random starts: the same in every run.


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Evaluates a checkpoint of `workdir` on the test split `config.data` selects; returns the report."""
  config_checks.validate(config)
  with contextlib.closing(checkpoint.open_checkpoints(workdir)) as manager:
    run = trained.load_trained_run(workdir, config)
    step = checkpoint.choose_step(manager, config.eval.checkpoint, run.info)
    split = inference.load_test_split(config.data, run.info)
    label_to_model = inference.model_indices(split.class_names, run.info.class_names)
    mesh = distributed.create_mesh()
    restored = quantize.serve(trained.restore(manager, run, step, mesh), config.quantize)
  check_attackable(config, restored)
  start = time.perf_counter()
  outputs = inference.forward(restored, split, config.eval_batch_size, config.eval.tta, mesh)
  logging.info('Evaluated %d images in %.1f s', len(split), time.perf_counter() - start)
  results = {
    'workdir': os.path.abspath(workdir),
    'checkpoint': config.eval.checkpoint,
    'checkpoint_step': restored.step,
    'checkpoint_chosen_by': checkpoint.chosen_by(run.info)
    if config.eval.checkpoint == 'best'
    else config.eval.checkpoint,
    'data': {'source': config.data.source, 'name': config.data.name, 'path': config.data.path, 'split': 'test'},
    **metrics.classification_metrics(outputs, split.labels, label_to_model, split.class_names, run.info.class_names),
    **metrics.tta_metrics(outputs, split.labels, label_to_model, config.eval.tta),
    'sparsity': prune.sparsity_report(quantize.stored_values(restored.variables['params']), run.config),
    'quantize': quantize.summary(restored.variables, restored.quantized),
  }
  if config.eval.attacks:
    results['adversarial'] = adversarial_metrics(restored, split, label_to_model, config, mesh)
  if config.eval.corruptions:
    plain_forward = inference.compile_forward(restored, 'none', mesh)  # Compiled once for every corrupted set.
    classify = lambda images: inference.forward(restored, images, config.eval_batch_size, 'none', mesh, plain_forward)
    results.update(corruptions.report(config, split, label_to_model, classify))
  name = report_paths.report_name(config.data) + quantize.report_suffix(restored.quantized)  # int8 apart from float.
  directory = os.path.join(workdir, 'eval', name)
  if jax.process_index() == 0:
    report.write_report(results, directory)
    write_predictions(outputs, split.labels, label_to_model, os.path.join(directory, PREDICTIONS_FILE))
    curves.write_training_curves(workdir, run.info.steps_per_epoch)
  tta = f', TTA ({config.eval.tta}) {results["tta_accuracy"]:.4f}' if 'tta_accuracy' in results else ''
  logging.info(
    'Step %d: accuracy %.4f%s, loss %.4f on %d images; report in %s',
    restored.step,
    results['accuracy'],
    tta,
    results['loss'],
    results['num_examples'],
    directory,
  )
  return results


def check_attackable(config: ml_collections.ConfigDict, restored: trained.Restored) -> None:
  """Refuses, before any work, attacks that cannot measure this model."""
  for name in config.eval.attacks:
    attacks.parse(name, restored.run.info.num_classes)
  if config.eval.attacks and restored.quantized is not None:
    raise ConfigError(
      'eval.attacks: the model serves in int8 (quantize.mode=ptq, or a run trained with qat, which always does); '
      'rounding makes its gradients zero almost everywhere, so the attacks would measure that instead of its '
      'robustness: attack a float run with --config.quantize.mode=none'
    )


def adversarial_metrics(
  restored: trained.Restored,
  split: ImageData,
  label_to_model: np.ndarray,
  config: ml_collections.ConfigDict,
  mesh: Mesh,
) -> dict[str, Any]:
  """The `adversarial` entry of report.json (`attacks.robustness_report`) on `eval.attack_examples` test images."""
  info = restored.run.info
  indices = data.stratified_subset(split.labels, config.eval.attack_examples, ATTACK_SEED)
  subset = ImageData(split.images[indices], label_to_model[split.labels[indices]].astype(np.int32), info.class_names)
  apply = lambda variables, pixels: restored.model.apply(
    variables, augment.normalize(pixels * 255, info.pixel_mean, info.pixel_std), train=False
  )
  start = time.perf_counter()
  results = attacks.robustness_report(
    attacks.Attacker(apply, config.eval.attack_norm),
    restored.variables,
    attack_batches(subset, indices, config.eval_batch_size, mesh),
    config.eval,
    ATTACK_SEED,
  )
  logging.info(
    'Attacked %d images in %.0f s: %s, worst case %.4f (clean %.4f) at %s epsilon %.4g',
    results['examples'],
    time.perf_counter() - start,
    ', '.join(f'{name} {accuracy:.4f}' for name, accuracy in results['accuracy'].items()),
    results['worst_case_accuracy'],
    results['clean_accuracy'],
    results['norm'],
    results['epsilon'],
  )
  chosen = 'all test images' if len(subset) == len(split) else f'class-stratified by seed {ATTACK_SEED}'
  return {'examples_chosen': f'{chosen} (data.stratified_subset), the same in every run', **results}


def attack_batches(subset: ImageData, indices: np.ndarray, batch_size: int, mesh: Mesh) -> Iterator[attacks.Batch]:
  """`subset` in sharded batches of pixels in [0, 1], with each example's index in the test split."""
  sharding, local = input_pipeline.data_sharding(mesh), input_pipeline.process_slice(batch_size)
  for start, (images, labels, real) in zip(
    range(0, len(subset), batch_size), inference.sharded_batches(subset, batch_size, mesh), strict=True
  ):
    batch_indices = np.pad(indices[start : start + batch_size], (0, batch_size - int(real.sum())))
    batch_indices = jax.make_array_from_process_local_data(sharding, batch_indices[local].astype(np.int32))
    yield attacks.Batch(images.astype(jnp.float32) / 255, labels, batch_indices, real)


def write_predictions(outputs: dict[str, np.ndarray], labels: np.ndarray, label_to_model: np.ndarray, path: str):
  """Per example, in the split's order: the true class and the predicted one (model class indices), and
  the probabilities (of TTA where it ran): what a user needs to inspect or re-score the predictions."""
  probabilities = outputs.get('tta_probabilities', np.exp(metrics.log_softmax(outputs['logits'])))
  np.savez(path, label=label_to_model[labels], prediction=outputs['logits'].argmax(axis=1), probabilities=probabilities)
