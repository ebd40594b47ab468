"""What an evaluation leaves on disk: report.json and its plots, in the directory `run.report_paths.report_dir`
names (matplotlib's object API: no pyplot, no global backend), and its entry of eval/index.json. Each evaluator
draws its own plot there. `report_key` decides which settings key that directory; `headline` picks the index's
numbers."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np
from matplotlib.figure import Figure

from resnet_flax import config_fields
from resnet_flax.compress import quantize
from resnet_flax.evaluate.evaluators import Evaluator
from resnet_flax.run import report_paths

CORE_HEADLINE = ('accuracy', 'loss', 'tta_accuracy')  # Of every report (tta_accuracy where TTA ran).


def report_key(
  config: ml_collections.ConfigDict, evaluators: Mapping[str, Evaluator], step: int, served: quantize.Recipe | None
) -> report_paths.Evaluation:
  """What tells this evaluation's report directory apart, decided field by field (configs/default.py):
  - the checkpoint's step, not `eval.checkpoint`: `best`, `latest` and a step that name one checkpoint give one report;
  - `eval.tta`: the TTA accuracy and the saved probabilities;
  - the model as served (`served`): float, or int8 by its recipe (`quantize.mode`, `.stem`, `.classifier`; a QAT
    run always serves as trained);
  - the evaluators that run (`eval.evaluators`, and those `eval.attacks` or `eval.corruptions` switch on), each
    with the fields it registers as its `settings`: the adversarial one `eval.attacks`, `.epsilon`, `.attack_norm`,
    `.attack_examples`, `.epsilon_curve`; the corruption one `eval.corruptions`, `.corruption_examples`,
    `.corruption_seed`, `.corruption_baseline` (its CE and mCE).
  Not `eval_batch_size` (every example counts once, whatever the batch) nor `eval.corruption_cache_dir` (a cache of
  the same images). What selects the data is `report_paths`' part of the key."""
  settings = {
    'eval.tta': config.eval.tta,
    'served': None if served is None else dataclasses.asdict(served),
    'evaluators': list(evaluators),
  }
  labels = ['' if config.eval.tta == 'none' else f'tta-{config.eval.tta}']
  for name, evaluator in evaluators.items():
    settings.update({field: config_fields.get(config, field) for field in evaluator.settings})
    labels.append(evaluator.label(config) if evaluator.label else name)
  labels.append('' if served is None else f'int8-{served.mode}')
  as_json = json.loads(json.dumps(settings))  # Tuples as lists: the index holds what the hash saw.
  return report_paths.Evaluation(step, '_'.join(label for label in labels if label), as_json)


def headline(report: Mapping[str, Any], evaluators: Mapping[str, Evaluator]) -> dict[str, float]:
  """The numbers eval/index.json lists of `report`: `CORE_HEADLINE` and those each evaluator registers."""
  numbers = {key: report[key] for key in CORE_HEADLINE if key in report}
  for name, evaluator in evaluators.items():
    numbers.update({key: report[name][field] for key, field in evaluator.headline.items()})
  return numbers


def write_report(report: dict[str, Any], directory: str, evaluators: Mapping[str, Evaluator]):
  """report.json, its plots, and those of the `evaluators` that ran (each draws its section)."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, report_paths.REPORT_FILE), 'w') as f:
    f.write(report_json(report))
  title = f'{os.path.basename(directory)}, step {report["checkpoint_step"]}'
  plot_confusion_matrix(report, title, os.path.join(directory, 'confusion_matrix.png'))
  plot_per_class(report, title, os.path.join(directory, 'per_class.png'))
  for name, evaluator in evaluators.items():
    if evaluator.plot:
      evaluator.plot(report[name], title, directory)


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
