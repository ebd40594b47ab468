"""The `corruptions` evaluator (`eval.corruptions` runs it): accuracy on CIFAR-10-C's corruptions of the test
images (`robust.corruptions.report`), each corrupted set classified by one forward pass compiled once without
test-time augmentation, and the heat map `corruptions.png` beside the report.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
import numpy as np
from matplotlib.figure import Figure

from resnet_flax.evaluate import evaluators, inference
from resnet_flax.evaluate.evaluators import EvalContext
from resnet_flax.robust import corruption_ops, corruptions

PLOT_FILE = 'corruptions.png'


def plot_corruptions(section: dict[str, Any], title: str, directory: str):
  """Accuracy per CIFAR-10-C corruption (rows) and severity (columns), with the clean and mean accuracies."""
  names = list(section['accuracy'])
  accuracy = np.array([section['accuracy'][name] for name in names])
  figure = Figure(figsize=(7, 1.5 + 0.4 * len(names)), layout='constrained')
  axes = figure.subplots()
  image = axes.imshow(accuracy, cmap='RdYlGn', vmin=0, vmax=1, aspect='auto')
  for (i, j), value in np.ndenumerate(accuracy):
    axes.text(j, i, f'{value:.1%}', ha='center', va='center', fontsize=8)
  axes.set_xticks(range(accuracy.shape[1]), [f'severity {s + 1}' for s in range(accuracy.shape[1])], fontsize=8)
  axes.set_yticks(range(len(names)), names, fontsize=8)
  mce = f', mCE {section["mce"]:.3f}' if section.get('mce') is not None else ''
  axes.set_title(
    f'{title}\ncorruptions of {section["examples"]:,} test images: clean {section["clean_accuracy"]:.1%}, '
    f'mean over corruptions {section["mean_accuracy"]:.1%}{mce}',
    fontsize=9,
  )
  figure.colorbar(image, ax=axes, label='accuracy', shrink=0.8)
  figure.savefig(os.path.join(directory, PLOT_FILE), dpi=100)


def corruptions_label(config: ml_collections.ConfigDict) -> str:
  """`c-all`, `c-fog+snow` (up to two names) or `c-<count>`: the report directory's label."""
  names = corruptions.parse_names(config.eval.corruptions)
  if names == tuple(corruption_ops.CORRUPTIONS):
    return 'c-all'
  return f'c-{"+".join(names) if len(names) <= 2 else len(names)}'


@evaluators.register(
  corruptions.REPORT_KEY,
  plot=plot_corruptions,
  switch='eval.corruptions',
  # Not eval.corruption_cache_dir: the cache holds the same images.
  settings=('eval.corruptions', 'eval.corruption_examples', 'eval.corruption_seed', 'eval.corruption_baseline'),
  label=corruptions_label,
  headline={'mean_corruption_accuracy': 'mean_accuracy'},
)
def corruption_section(context: EvalContext) -> dict[str, Any]:
  """The `corruptions` entry of report.json."""
  restored, mesh, batch_size = context.restored, context.mesh, context.config.eval_batch_size
  plain_forward = inference.compile_forward(restored, 'none', mesh)  # Compiled once for every corrupted set.
  classify = lambda images: inference.forward(restored, images, batch_size, 'none', mesh, plain_forward)
  return corruptions.report(context.config, context.split, context.label_to_model, classify)
