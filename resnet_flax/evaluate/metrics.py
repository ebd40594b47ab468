"""The metrics of an evaluation report, on the host in float64 (see `resnet_flax.evaluate` for their
definitions): the same outputs give the same report whatever produced them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from resnet_flax.data import augment

ECE_BINS = 15


TOP_K = 5  # Top-5 accuracy is reported for models with more than 5 classes.


def log_softmax(logits: np.ndarray) -> np.ndarray:
  shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def expected_calibration_error(confidences: np.ndarray, correct: np.ndarray, num_bins: int = ECE_BINS) -> float:
  bins = np.minimum((confidences * num_bins).astype(np.int64), num_bins - 1)
  gaps = [
    abs(correct[bins == b].mean() - confidences[bins == b].mean()) * np.sum(bins == b)
    for b in range(num_bins)
    if np.any(bins == b)
  ]
  return float(np.sum(gaps) / len(confidences))


def precision_recall_f1(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per-class precision, recall and F1 of the rows of a confusion matrix (module docstring), float64."""
  rows = len(matrix)
  true_positives = np.diag(matrix[:, :rows]).astype(np.float64)
  predicted, actual = matrix[:, :rows].sum(axis=0), matrix.sum(axis=1)
  ratio = lambda numerator, denominator: np.divide(
    numerator, denominator, out=np.zeros(rows), where=denominator > 0, dtype=np.float64
  )
  return ratio(true_positives, predicted), ratio(true_positives, actual), ratio(2 * true_positives, predicted + actual)


def classification_metrics(
  outputs: dict[str, np.ndarray],
  labels: np.ndarray,
  label_to_model: np.ndarray,
  class_names: Sequence[str],
  model_class_names: Sequence[str],
) -> dict[str, Any]:
  """Metrics of the plain predictions; `labels` index `class_names`, logits index the model's classes."""
  logits, targets = outputs['logits'].astype(np.float64), label_to_model[labels]
  log_probabilities = log_softmax(logits)
  probabilities = np.exp(log_probabilities)
  predictions = logits.argmax(axis=1)
  columns = list(label_to_model) + [j for j in range(len(model_class_names)) if j not in set(label_to_model)]
  column_of = np.argsort(columns)  # Model class -> confusion matrix column.
  matrix = np.zeros((len(class_names), len(model_class_names)), np.int64)
  np.add.at(matrix, (labels, column_of[predictions]), 1)
  per_class = {
    name: (float(matrix[i, i] / matrix[i].sum()) if matrix[i].sum() else None) for i, name in enumerate(class_names)
  }
  precision, recall, f1 = precision_recall_f1(matrix)
  report = {
    'num_examples': len(labels),
    'accuracy': float(np.trace(matrix) / len(labels)),
    'loss': float(-np.mean(log_probabilities[np.arange(len(labels)), targets])),
  }
  if len(model_class_names) > TOP_K:
    top = np.argsort(-logits, axis=1, kind='stable')[:, :TOP_K]
    report['top5_accuracy'] = float(np.mean(np.any(top == targets[:, None], axis=1)))
  report.update(
    {
      'expected_calibration_error': expected_calibration_error(probabilities.max(axis=1), predictions == targets),
      'per_class_accuracy': per_class,
      'per_class_precision': dict(zip(class_names, precision.tolist(), strict=True)),
      'per_class_recall': dict(zip(class_names, recall.tolist(), strict=True)),
      'per_class_f1': dict(zip(class_names, f1.tolist(), strict=True)),
      'macro_precision': float(precision.mean()),
      'macro_recall': float(recall.mean()),
      'macro_f1': float(f1.mean()),
      'class_names': list(class_names),
      'predicted_class_names': [model_class_names[j] for j in columns],
      'confusion_matrix': matrix.tolist(),
    }
  )
  return report


def tta_metrics(
  outputs: dict[str, np.ndarray], labels: np.ndarray, label_to_model: np.ndarray, tta: str
) -> dict[str, Any]:
  report = {'tta': tta}
  if 'tta_probabilities' in outputs:
    predictions = outputs['tta_probabilities'].argmax(axis=1)
    report.update(
      {'tta_views': len(augment.TTA_VIEWS[tta]), 'tta_accuracy': float(np.mean(predictions == label_to_model[labels]))}
    )
  return report
