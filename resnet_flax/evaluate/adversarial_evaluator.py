"""The `adversarial` evaluator (`eval.attacks` runs it): accuracy under the attacks of `robust.attacks`.

It attacks `eval.attack_examples` test images, a class-stratified subset that is the same in every run
(`data.stratified_subset` by `ATTACK_SEED`), in sharded batches of pixels in [0, 1], and draws
`accuracy_vs_epsilon.png` beside the report. A model served in int8 is refused before any work.
"""

from __future__ import annotations

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
from matplotlib.figure import Figure

from resnet_flax import data, models
from resnet_flax.data import ImageData, input_pipeline
from resnet_flax.errors import ConfigError
from resnet_flax.evaluate import evaluators, inference
from resnet_flax.evaluate.evaluators import EvalContext
from resnet_flax.robust import attacks

ATTACK_SEED = 0  # Which test images are attacked, and their random starts: the same in every run.
PLOT_FILE = 'accuracy_vs_epsilon.png'


def check_attackable(context: EvalContext) -> None:
  """Refuses, before any work, attacks that cannot measure this model."""
  config, restored = context.config, context.restored
  for name in config.eval.attacks:
    attacks.parse(name, restored.run.info.num_classes)
  if config.eval.attacks and restored.quantized is not None:
    raise ConfigError(
      'eval.attacks: the model serves in int8 (quantize.mode=ptq, or a run trained with qat, which always does); '
      'rounding makes its gradients zero almost everywhere, so the attacks would measure that instead of its '
      'robustness: attack a float run with --config.quantize.mode=none'
    )


def epsilon_axis(norm: str) -> tuple[float, str]:
  """What the ε axis shows of a radius (pixels in [0, 1]) and its label: L-inf radii in 1/255ths, as papers write
  them (8 means 8/255); L2 radii as they are."""
  if norm == 'linf':
    return 255.0, 'L-inf radius ε, in 1/255 of the pixel range (8 means ε = 8/255)'
  return 1.0, f'{norm} radius ε, pixels in [0, 1]'


def plot_accuracy_vs_epsilon(adversarial: dict[str, Any], title: str, directory: str):
  """Robust accuracy of each attack and of their per-example worst case against the radius ε."""
  curve = adversarial['curve']
  scale, label = epsilon_axis(adversarial['norm'])
  radii = [0.0] + [e * scale for e in curve['epsilons']]
  figure = Figure(figsize=(7, 4.5), layout='constrained')
  axes = figure.subplots()
  for name in [*adversarial['accuracy'], 'worst_case']:
    style = {'color': 'black', 'linestyle': '--', 'linewidth': 2} if name == 'worst_case' else {}
    points = [
      (r, a) for r, a in zip(radii, [adversarial['clean_accuracy'], *curve[name]], strict=True) if a is not None
    ]
    axes.plot(*zip(*points, strict=True), marker='o', label=name, **style)  # APGD: from epsilon on.
  axes.axvline(adversarial['epsilon'] * scale, color='grey', linewidth=0.8)
  axes.set_xlabel(label)
  axes.set_ylabel('accuracy')
  axes.set_ylim(0, 1)
  axes.legend()
  axes.set_title(f'{title}\naccuracy under attack, {adversarial["examples"]} test images')
  figure.savefig(os.path.join(directory, PLOT_FILE), dpi=100)


def attacks_label(config: ml_collections.ConfigDict) -> str:
  """`pgd20-linf-eps8`, `pgd20-l2-eps0.5`: the attacks, the norm and ε in the plot's units (the report
  directory's label)."""
  scale, _ = epsilon_axis(config.eval.attack_norm)
  return f'{"+".join(config.eval.attacks)}-{config.eval.attack_norm}-eps{config.eval.epsilon * scale:.4g}'


@evaluators.register(
  'adversarial',
  check=check_attackable,
  plot=plot_accuracy_vs_epsilon,
  switch='eval.attacks',
  settings=('eval.attacks', 'eval.epsilon', 'eval.attack_norm', 'eval.attack_examples', 'eval.epsilon_curve'),
  label=attacks_label,
  headline={'worst_case_adversarial_accuracy': 'worst_case_accuracy'},
)
def adversarial_section(context: EvalContext) -> dict[str, Any]:
  """The `adversarial` entry of report.json (`attacks.robustness_report`) on `eval.attack_examples` test images."""
  restored, split, config = context.restored, context.split, context.config
  info = restored.run.info
  indices = data.stratified_subset(split.labels, config.eval.attack_examples, ATTACK_SEED)
  labels = context.label_to_model[split.labels[indices]].astype(np.int32)
  subset = ImageData(split.images[indices], labels, info.class_names)
  apply = lambda variables, pixels: models.apply_to_pixels(
    restored.model.apply, variables, pixels * 255, info.pixel_mean, info.pixel_std
  )
  start = time.perf_counter()
  results = attacks.robustness_report(
    attacks.Attacker(apply, config.eval.attack_norm),
    restored.variables,
    attack_batches(subset, indices, config.eval_batch_size, context.mesh),
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
