"""What an evaluation leaves on disk: report.json and its plots, in the directory that
`run.report_paths.report_name` names (matplotlib's object API: no pyplot, no global backend)."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from matplotlib.figure import Figure


def write_report(report: dict[str, Any], directory: str):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'report.json'), 'w') as f:
    f.write(report_json(report))
  title = f'{os.path.basename(directory)}, step {report["checkpoint_step"]}'
  plot_confusion_matrix(report, title, os.path.join(directory, 'confusion_matrix.png'))
  plot_per_class(report, title, os.path.join(directory, 'per_class.png'))
  if 'adversarial' in report:
    plot_accuracy_vs_epsilon(report['adversarial'], title, os.path.join(directory, 'accuracy_vs_epsilon.png'))
  if 'corruptions' in report:
    plot_corruptions(report['corruptions'], title, os.path.join(directory, 'corruptions.png'))


def report_json(report: dict[str, Any]) -> str:
  """Indented JSON with one line per confusion matrix row (a 100-class matrix stays readable)."""
  rows = ',\n    '.join(json.dumps(row) for row in report['confusion_matrix'])
  text = json.dumps({**report, 'confusion_matrix': '<rows>'}, indent=2)
  return text.replace('"<rows>"', f'[\n    {rows}\n  ]') + '\n'


def plot_confusion_matrix(report: dict[str, Any], title: str, path: str):
  """Counts, coloured by the fraction of the true class; names on both axes."""
  matrix = np.array(report['confusion_matrix'])
  rows, cols = matrix.shape
  fractions = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
  figure = Figure(figsize=(min(40, 3 + 0.45 * cols), min(40, 2 + 0.45 * rows)), layout='constrained')
  axes = figure.subplots()
  image = axes.imshow(fractions, cmap='Blues', vmin=0, vmax=1)
  font_size = 8 if max(rows, cols) <= 30 else 5
  axes.set_xticks(range(cols), report['predicted_class_names'], rotation=90, fontsize=font_size)
  axes.set_yticks(range(rows), report['class_names'], fontsize=font_size)
  if max(rows, cols) <= 30:
    for (i, j), count in np.ndenumerate(matrix):
      axes.text(
        j, i, str(count), ha='center', va='center', fontsize=7, color='white' if fractions[i, j] > 0.5 else 'black'
      )
  axes.set_xlabel('predicted class')
  axes.set_ylabel('true class')
  axes.set_title(f'{title}\naccuracy {report["accuracy"]:.2%} of {report["num_examples"]:,} images')
  figure.colorbar(image, ax=axes, label='fraction of the true class', shrink=0.8)
  figure.savefig(path, dpi=100)


def plot_per_class(report: dict[str, Any], title: str, path: str):
  names = report['class_names']
  accuracies = [report['per_class_accuracy'][name] for name in names]
  figure = Figure(figsize=(8, min(40, 1.5 + 0.3 * len(names))), layout='constrained')
  axes = figure.subplots()
  bars = axes.barh(range(len(names)), [a or 0.0 for a in accuracies], color='tab:blue')
  f1 = [report['per_class_f1'][name] for name in names]
  labels = ['no images' if a is None else f'{a:.1%}, F1 {f:.2f}' for a, f in zip(accuracies, f1, strict=True)]
  axes.bar_label(bars, labels, padding=3, fontsize=7)
  axes.axvline(report['accuracy'], color='tab:red', linestyle='--')
  axes.set_yticks(range(len(names)), names, fontsize=8 if len(names) <= 30 else 5)
  axes.invert_yaxis()
  axes.set_xlim(0, 1.1)
  axes.set_xlabel('accuracy')
  axes.set_title(
    f'{title}\nper-class accuracy (= recall) and F1 (dashed line: overall accuracy {report["accuracy"]:.2%}, '
    f'macro F1 {report["macro_f1"]:.2f})'
  )
  figure.savefig(path, dpi=100)


def plot_accuracy_vs_epsilon(adversarial: dict[str, Any], title: str, path: str):
  """Robust accuracy of each attack and of their per-example worst case against the radius ε (in 1/255)."""
  curve = adversarial['curve']
  radii = [0.0] + [e * 255 for e in curve['epsilons']]
  figure = Figure(figsize=(7, 4.5), layout='constrained')
  axes = figure.subplots()
  for name in [*adversarial['accuracy'], 'worst_case']:
    style = {'color': 'black', 'linestyle': '--', 'linewidth': 2} if name == 'worst_case' else {}
    points = [
      (r, a) for r, a in zip(radii, [adversarial['clean_accuracy'], *curve[name]], strict=True) if a is not None
    ]
    axes.plot(*zip(*points, strict=True), marker='o', label=name, **style)  # APGD: from epsilon on.
  axes.axvline(adversarial['epsilon'] * 255, color='grey', linewidth=0.8)
  axes.set_xlabel(f'{adversarial["norm"]} radius ε (x 1/255, pixels in [0, 1])')
  axes.set_ylabel('accuracy')
  axes.set_ylim(0, 1)
  axes.legend()
  axes.set_title(f'{title}\naccuracy under attack, {adversarial["examples"]} test images')
  figure.savefig(path, dpi=100)


def plot_corruptions(corruptions: dict[str, Any], title: str, path: str):
  """Accuracy per CIFAR-10-C corruption (rows) and severity (columns), with the clean and mean accuracies."""
  names = list(corruptions['accuracy'])
  accuracy = np.array([corruptions['accuracy'][name] for name in names])
  figure = Figure(figsize=(7, 1.5 + 0.4 * len(names)), layout='constrained')
  axes = figure.subplots()
  image = axes.imshow(accuracy, cmap='RdYlGn', vmin=0, vmax=1, aspect='auto')
  for (i, j), value in np.ndenumerate(accuracy):
    axes.text(j, i, f'{value:.1%}', ha='center', va='center', fontsize=8)
  axes.set_xticks(range(accuracy.shape[1]), [f'severity {s + 1}' for s in range(accuracy.shape[1])], fontsize=8)
  axes.set_yticks(range(len(names)), names, fontsize=8)
  mce = f', mCE {corruptions["mce"]:.3f}' if corruptions.get('mce') is not None else ''
  axes.set_title(
    f'{title}\ncorruptions of {corruptions["examples"]:,} test images: clean {corruptions["clean_accuracy"]:.1%}, '
    f'mean over corruptions {corruptions["mean_accuracy"]:.1%}{mce}',
    fontsize=9,
  )
  figure.colorbar(image, ax=axes, label='accuracy', shrink=0.8)
  figure.savefig(path, dpi=100)
