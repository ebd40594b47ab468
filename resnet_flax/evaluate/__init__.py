"""Evaluation of a workdir's checkpoints: restore the weights, one sharded forward pass, the metrics.

`evaluate_checkpoint` restores one checkpoint (best by validation accuracy, which is the final one
when the run had no validation split; latest; or a step), runs one jitted forward
pass sharded over the ('data',) mesh on every example of the test split exactly once (padded,
masked batches), and computes the report on the host in float64 numpy, so the same checkpoint
gives the identical report on any number of devices. It writes a directory of its own,
`<workdir>/eval/<data>-step<N>-<label>-<hash>/` (`run.report_paths.report_dir`, keyed by the settings
`report.report_key` names): `report.json`, `predictions.npz`, `confusion_matrix.png`, `per_class.png`;
adds its entry to `<workdir>/eval/index.json`; and draws `<workdir>/training_curves.png` (see `report`).
Any image is resized as the run's were (run.json). A model is served in int8 (`quantize`) by PTQ on
request, a QAT run always. TTA and int8 are options of the forward pass.

More sections come from the evaluators the config chooses (`evaluators`: registered by name, run after
the forward pass on the restored model and the test split, each returning its section of report.json
and drawing its plot). Built in, on a class-stratified subset of the test split that is the same in
every run (`data.stratified_subset`): accuracy under adversarial attacks (`eval.attacks`,
`adversarial_evaluator`; plot `accuracy_vs_epsilon.png`) and on the CIFAR-10-C corruptions
(`eval.corruptions`, `corruption_evaluator`; heat map `corruptions.png`); `eval.evaluators` names
any registered one.

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

import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

import resnet_flax.evaluate.adversarial_evaluator  # noqa: F401 (registers `adversarial`: its section first)
import resnet_flax.evaluate.corruption_evaluator  # noqa: F401 (registers `corruptions`: its section next)
from resnet_flax import data
from resnet_flax.compress import prune, quantize
from resnet_flax.evaluate import evaluators, inference, metrics, report
from resnet_flax.models import trained
from resnet_flax.run import checkpoint, curves, distributed, report_paths
from resnet_flax.train import config_checks

PREDICTIONS_FILE = 'predictions.npz'


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Evaluates a checkpoint of `workdir` on the test split `config.data` selects; returns the report."""
  config_checks.validate(config)
  evaluators.check_config(config)
  mesh = distributed.create_mesh()
  restored = quantize.serve(trained.restore_workdir(workdir, config, config.eval.checkpoint, mesh), config.quantize)
  split = inference.load_test_split(config.data, restored.run.info)
  label_to_model = data.class_indices(split.class_names, restored.run.info.class_names)
  context = evaluators.EvalContext(restored, split, label_to_model, config, mesh)
  active = evaluators.active(config)
  for evaluator in active.values():
    if evaluator.check:
      evaluator.check(context)
  start = time.perf_counter()
  outputs = inference.forward(restored, split, config.eval_batch_size, config.eval.tta, mesh)
  logging.info('Evaluated %d images in %.1f s', len(split), time.perf_counter() - start)
  results = {'workdir': os.path.abspath(workdir), **core_metrics(context, outputs)}
  for name, evaluator in active.items():
    results[name] = evaluator.evaluate(context)
  key = report.report_key(config, active, restored.step, restored.quantized)
  directory = report_paths.report_dir(workdir, config.data, key)
  if jax.process_index() == 0:
    report.write_report(results, directory, active)
    write_predictions(outputs, split.labels, label_to_model, os.path.join(directory, PREDICTIONS_FILE))
    report_paths.record(workdir, config.data, key, report.headline(results, active))
    curves.write_training_curves(workdir, restored.run.info.steps_per_epoch)
  log_summary(results, config.eval.tta, directory)
  return results


def core_metrics(context: evaluators.EvalContext, outputs: dict[str, np.ndarray]) -> dict[str, Any]:
  """What every report holds: the checkpoint, the data, the metrics of the forward pass's `outputs`, and how
  the weights are stored (sparsity, int8)."""
  config, restored, split, label_to_model = context.config, context.restored, context.split, context.label_to_model
  run = restored.run
  return {
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


def log_summary(results: dict[str, Any], tta_mode: str, directory: str) -> None:
  tta = f', TTA ({tta_mode}) {results["tta_accuracy"]:.4f}' if 'tta_accuracy' in results else ''
  logging.info(
    'Step %d: accuracy %.4f%s, loss %.4f on %d images; report in %s',
    results['checkpoint_step'],
    results['accuracy'],
    tta,
    results['loss'],
    results['num_examples'],
    directory,
  )


def write_predictions(outputs: dict[str, np.ndarray], labels: np.ndarray, label_to_model: np.ndarray, path: str):
  """Per example, in the split's order: the true class and the predicted one (model class indices), and
  the probabilities (of TTA where it ran): what a user needs to inspect or re-score the predictions."""
  probabilities = outputs.get('tta_probabilities', np.exp(metrics.log_softmax(outputs['logits'])))
  np.savez(path, label=label_to_model[labels], prediction=outputs['logits'].argmax(axis=1), probabilities=probabilities)
