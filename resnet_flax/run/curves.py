"""`<workdir>/training_curves.png`: a run's TensorBoard scalars drawn against epochs (matplotlib's object
API: no pyplot, no global backend). Training draws it at its end, evaluation again with what is there."""

from __future__ import annotations

import os

import numpy as np
from absl import logging
from matplotlib.figure import Figure

from resnet_flax.run import writers
from resnet_flax.run.workdir import epochs_at

FEW_POINTS = 20  # A series with fewer points is drawn with markers: a single point draws no line at all.


def write_training_curves(workdir: str, steps_per_epoch: int) -> str | None:
  """`<workdir>/training_curves.png`: loss, accuracy and learning rate against epochs, from TensorBoard."""
  scalars = writers.read_scalars(workdir)
  panels = {
    'loss': ('train_loss', 'eval_loss'),
    'accuracy': ('train_accuracy', 'eval_accuracy'),
    'learning rate': ('train_learning_rate',),
  }
  if not any(tag in scalars for tags in panels.values() for tag in tags):
    logging.info('No training scalars in %s: no training_curves.png', workdir)
    return None
  figure = Figure(figsize=(15, 4), layout='constrained')
  for axes, (name, tags) in zip(figure.subplots(1, 3), panels.items(), strict=True):
    for tag in tags:
      if tag in scalars:
        steps, values = zip(*scalars[tag], strict=True)
        axes.plot(
          epochs_at(np.array(steps), steps_per_epoch),
          values,
          label=tag.replace('_', ' '),
          marker='o' if tag.startswith('eval') or len(steps) < FEW_POINTS else None,
          markersize=3,
        )
    if name == 'loss':  # Early losses can be thousands of times the final ones: a log axis shows both.
      axes.set_yscale('log')
    axes.set_xlabel('epoch')
    axes.set_title(name)
    axes.grid(alpha=0.3)
    axes.legend()
  figure.suptitle(os.path.basename(os.path.normpath(workdir)))
  path = os.path.join(workdir, 'training_curves.png')
  figure.savefig(path, dpi=100)
  return path
