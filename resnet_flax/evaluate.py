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
import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_flax import (
  attacks,
  augment,
  checkpoint,
  config_checks,
  corruptions,
  data,
  distributed,
  input_pipeline,
  models,
  prune,
  quantize,
  report,
)
from resnet_flax.data import DataError, ImageData
from resnet_flax.errors import ConfigError
from resnet_flax.workdir import CONFIG_FILE, RUN_FILE, RunInfo, steps_per_epoch

ECE_BINS = 15
TOP_K = 5  # Top-5 accuracy is reported for models with more than 5 classes.
PREDICTIONS_FILE = 'predictions.npz'
PROGRESS_EVERY_S = 5.0  # An evaluation logs its progress this often, so short ones stay quiet.
ATTACK_SEED = 0  # Which test images are attacked, and their random starts: the same in every run.


@dataclasses.dataclass(frozen=True)
class TrainedRun:
  """What evaluation needs to know about the run that made a workdir's checkpoints."""

  config: ml_collections.ConfigDict  # The run's config (config.json): the model to rebuild.
  info: RunInfo  # Its run.json.


@dataclasses.dataclass(frozen=True)
class Restored:
  run: TrainedRun
  model: nn.Module
  variables: dict[str, Any]  # {'params', 'batch_stats'}, replicated over the mesh.
  step: int
  quantized: quantize.Recipe | None = None  # How `model` and `variables` serve in int8; None: float.


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Evaluates a checkpoint of `workdir` on the test split `config.data` selects; returns the report."""
  config_checks.validate(config)
  with contextlib.closing(open_checkpoints(workdir)) as manager:
    run = load_trained_run(workdir, config)
    step = choose_step(manager, config.eval.checkpoint, run.info)
    split = load_test_split(config.data, run.info)
    label_to_model = model_indices(split.class_names, run.info.class_names)
    mesh = distributed.create_mesh()
    restored = restore(manager, run, step, mesh, config.quantize)
  check_attackable(config, restored)
  start = time.perf_counter()
  outputs = forward(restored, split, config.eval_batch_size, config.eval.tta, mesh)
  logging.info('Evaluated %d images in %.1f s', len(split), time.perf_counter() - start)
  results = {
    'workdir': os.path.abspath(workdir),
    'checkpoint': config.eval.checkpoint,
    'checkpoint_step': restored.step,
    'checkpoint_chosen_by': chosen_by(run.info) if config.eval.checkpoint == 'best' else config.eval.checkpoint,
    'data': {'source': config.data.source, 'name': config.data.name, 'path': config.data.path, 'split': 'test'},
    **classification_metrics(outputs, split.labels, label_to_model, split.class_names, run.info.class_names),
    **tta_metrics(outputs, split.labels, label_to_model, config.eval.tta),
    'sparsity': prune.sparsity_report(quantize.stored_values(restored.variables['params']), run.config),
    'quantize': quantize.summary(restored.variables, restored.quantized),
  }
  if config.eval.attacks:
    results['adversarial'] = adversarial_metrics(restored, split, label_to_model, config, mesh)
  if config.eval.corruptions:
    plain_forward = compile_forward(restored, 'none', mesh)  # Compiled once for every corrupted set.
    classify = lambda images: forward(restored, images, config.eval_batch_size, 'none', mesh, plain_forward)
    results.update(corruptions.report(config, split, label_to_model, classify))
  name = report.report_name(config.data) + quantize.report_suffix(restored.quantized)  # int8 apart from float.
  directory = os.path.join(workdir, 'eval', name)
  if jax.process_index() == 0:
    report.write_report(results, directory)
    write_predictions(outputs, split.labels, label_to_model, os.path.join(directory, PREDICTIONS_FILE))
    report.write_training_curves(workdir, run.info.steps_per_epoch)
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


def check_attackable(config: ml_collections.ConfigDict, restored: Restored) -> None:
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
  restored: Restored, split: ImageData, label_to_model: np.ndarray, config: ml_collections.ConfigDict, mesh: Mesh
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
    range(0, len(subset), batch_size), sharded_batches(subset, batch_size, mesh), strict=True
  ):
    batch_indices = np.pad(indices[start : start + batch_size], (0, batch_size - int(real.sum())))
    batch_indices = jax.make_array_from_process_local_data(sharding, batch_indices[local].astype(np.int32))
    yield attacks.Batch(images.astype(jnp.float32) / 255, labels, batch_indices, real)


def write_predictions(outputs: dict[str, np.ndarray], labels: np.ndarray, label_to_model: np.ndarray, path: str):
  """Per example, in the split's order: the true class and the predicted one (model class indices), and
  the probabilities (of TTA where it ran): what a user needs to inspect or re-score the predictions."""
  probabilities = outputs.get('tta_probabilities', np.exp(log_softmax(outputs['logits'])))
  np.savez(path, label=label_to_model[labels], prediction=outputs['logits'].argmax(axis=1), probabilities=probabilities)


# Restoring.


def load_trained_run(workdir: str, config: ml_collections.ConfigDict) -> TrainedRun:
  """Reads config.json and run.json; what run.json lacks comes from the training data of config.json.

  config.json overrides `config` (the current one): a field added to the code after the run was
  saved keeps its value from `config` (usually its default) instead of failing.
  """
  paths = [os.path.join(workdir, name) for name in (CONFIG_FILE, RUN_FILE)]
  if not all(os.path.isfile(path) for path in paths):
    raise ConfigError(
      f'{workdir} holds no trained run ({CONFIG_FILE} and {RUN_FILE} are missing): '
      f'train one with --mode=train --workdir={workdir}, or point --workdir at a trained run'
    )
  config = ml_collections.ConfigDict(config.to_dict())
  with open(paths[0]) as f:
    config.update(json.load(f))
  derive = lambda saved: facts_from_training_data(config, workdir, saved['num_classes'])
  return TrainedRun(config, RunInfo.load(workdir, derive_missing_facts=derive))


def facts_from_training_data(config: ml_collections.ConfigDict, workdir: str, num_classes: int) -> dict[str, Any]:
  train_split = data.load_splits(config.data)['train']
  if len(train_split.class_names) != num_classes:
    raise DataError(
      f'the training data of {workdir} ({config.data.source} {config.data.path!r}) now has '
      f'{len(train_split.class_names)} classes but the checkpoints have {num_classes}: '
      'restore the data the model was trained on'
    )
  mean, std = augment.channel_stats(train_split.images)
  return {
    'class_names': train_split.class_names,
    'pixel_mean': mean,
    'pixel_std': std,
    'steps_per_epoch': steps_per_epoch(len(train_split), config.batch_size),
  }


def open_checkpoints(workdir: str) -> ocp.CheckpointManager:
  """A read-only manager: unlike `checkpoint.create_manager` it never cleans up temporary directories,
  so evaluating while training runs cannot delete the save in progress."""
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  manager = None
  if os.path.isdir(directory):
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    manager = ocp.CheckpointManager(directory, options=options)
  if manager is None or not manager.all_steps():
    raise ConfigError(
      f'{workdir} has no checkpoint to evaluate: train first with --mode=train '
      f'--workdir={workdir}, or point --workdir at a trained run'
    )
  return manager


def choose_step(manager: ocp.CheckpointManager, choice: str, info: RunInfo, field: str = 'eval.checkpoint') -> int:
  """The step of `choice`, the value of config field `field`: 'best', 'latest' or a step.

  'best' is the best by validation accuracy, and the latest where the run had no validation split
  (`info.validation`): the test split never chooses, also in workdirs whose checkpoints an earlier
  version ranked by test accuracy.
  """
  steps = manager.all_steps()
  if choice == 'latest':
    return max(steps)
  if choice == 'best':
    best = checkpoint.best_step(manager) if info.validation else None
    if best is None:
      logging.info('%s: the best is the latest, step %d', chosen_by(info), max(steps))
      return max(steps)
    return best
  if int(choice) not in steps:
    raise ConfigError(
      f'there is no checkpoint of step {choice} in {manager.directory}; it has steps '
      f'{sorted(steps)}: choose one of them, best or latest with --config.{field}'
    )
  return int(choice)


def chosen_by(info: RunInfo) -> str:
  """What `eval.checkpoint=best` chooses by, for reports."""
  if info.validation:
    return f'validation accuracy, on {info.validation}'
  return 'none: the run had no validation split, so best is the final checkpoint (never chosen by test accuracy)'


def restore(
  manager: ocp.CheckpointManager,
  run: TrainedRun,
  step: int,
  mesh: Mesh,
  quantize_config: ml_collections.ConfigDict | None = None,
) -> Restored:
  """The weights evaluation uses from checkpoint `step`, replicated over `mesh`: the EMA of the weights
  when training kept one (as the evaluation during training does), else the weights themselves.

  Only those are restored (`checkpoint.restore_subset`): the optimizer and its state play no part.
  With `quantize_config` (the `quantize` section of the config that evaluates or serves) they serve
  as `quantize.served_recipe` says: in int8 for PTQ and for a QAT run. Without it, the float model
  and weights, a QAT run's too (what a fine-tune starts from and a teacher runs).
  """
  config = run.config
  model = models.create_model_from_config(config, run.info.num_classes)
  replicated = NamedSharding(mesh, P())
  variables = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
    dict(models.init_variables(model, run.info.image_shape)),
  )
  if config.ema_decay > 0:
    variables = checkpoint.restore_subset(manager, {'ema': variables}, step)['ema']
  else:
    variables = checkpoint.restore_subset(manager, variables, step)
  if quantize_config is None:
    return Restored(run, model, variables, step)
  recipe = quantize.served_recipe(quantize_config, run.info.quantize)
  return Restored(run, *quantize.serving_model(model, variables, run.info.image_shape, recipe), step, recipe)


# Data.


def load_test_split(data_config: ml_collections.ConfigDict, info: RunInfo) -> ImageData:
  """The test split, its images resized as the run's were (`resized_as_trained`)."""
  split = data.load_test_split(resized_as_trained(data_config, info))
  check_image_shape(split.images.shape[1:], info.image_shape, f'the test split of data.source={data_config.source}')
  return split


def resized_as_trained(data_config: ml_collections.ConfigDict, info: RunInfo) -> ml_collections.ConfigDict:
  """`data_config` with the run's image size and resize policy: any image becomes what the model saw."""
  height, width, _ = info.image_shape
  resized = ml_collections.ConfigDict(data_config.to_dict())
  resized.image_size, resized.resize = (height if height == width else 0), info.resize
  return resized


def check_image_shape(shape: Sequence[int], model_shape: Sequence[int], what: str):
  if tuple(shape) != tuple(model_shape):
    raise DataError(
      f'{what}: {"x".join(map(str, shape))} (HxWxC) images, but the model was trained on '
      f'{"x".join(map(str, model_shape))}, which are not square: resize them to that size beforehand'
    )


def model_indices(class_names: Sequence[str], model_class_names: Sequence[str]) -> np.ndarray:
  """Model output index of each of the data's classes, matched by name."""
  unknown = [name for name in class_names if name not in model_class_names]
  if unknown:
    raise DataError(
      f'the model does not know the classes {unknown} of the evaluated data; it knows '
      f'{list(model_class_names)}: rename or remove those class folders'
    )
  return np.array([list(model_class_names).index(name) for name in class_names], np.int64)


# The forward pass.


def forward_views(
  variables, images: jax.Array, *, model: nn.Module, mean, std, views: tuple[tuple[bool, int], ...]
) -> dict[str, jax.Array]:
  """Logits of the plain images and, with several views, the mean softmax over the views."""
  logits = [model.apply(variables, augment.normalize(augment.view(images, *v), mean, std), train=False) for v in views]
  outputs = {'logits': logits[0]}
  if len(views) > 1:
    outputs['tta_probabilities'] = jnp.mean(jnp.stack([jax.nn.softmax(l) for l in logits]), axis=0)
  return outputs


def compile_forward(restored: Restored, tta: str, mesh: Mesh) -> Callable:
  """`forward_views` of `restored` with the views of `tta`, jitted over `mesh`: (variables, images) -> outputs."""
  return jax.jit(
    lambda variables, images: forward_views(
      variables,
      images,
      model=restored.model,
      mean=restored.run.info.pixel_mean,
      std=restored.run.info.pixel_std,
      views=augment.TTA_VIEWS[tta],
    ),
    in_shardings=(NamedSharding(mesh, P()), input_pipeline.data_sharding(mesh)),
    out_shardings=NamedSharding(mesh, P()),
  )


def forward(
  restored: Restored, split: ImageData, batch_size: int, tta: str, mesh: Mesh, forward_fn: Callable | None = None
) -> dict[str, np.ndarray]:
  """Per-example outputs of `forward_views` for every example of `split` once, in order, on the host.

  `forward_fn` (of `compile_forward`) saves compiling again when called repeatedly (the Python API).
  """
  forward_fn = forward_fn or compile_forward(restored, tta, mesh)
  collected = []
  for images, _, real in with_progress(
    sharded_batches(split, batch_size, mesh), -(-len(split) // batch_size), 'evaluation'
  ):
    collected.append({k: v[real] for k, v in jax.device_get(forward_fn(restored.variables, images)).items()})
  return {k: np.concatenate([c[k] for c in collected]) for k in collected[0]}


def sharded_batches(split: ImageData, batch_size: int, mesh: Mesh) -> Iterator[tuple[jax.Array, jax.Array, np.ndarray]]:
  """(images, labels, real) of every example of `split` once, in padded batches sharded over `mesh`;
  `real` (on the host) is False for the padding."""
  sharding, local = input_pipeline.data_sharding(mesh), input_pipeline.process_slice(batch_size)
  for batch in input_pipeline.padded_batches(split, batch_size):
    images, labels = (jax.make_array_from_process_local_data(sharding, batch[k][local]) for k in ('image', 'label'))
    yield images, labels, batch['mask'] > 0


def with_progress(items: Iterator, total: int, what: str) -> Iterator:
  """Yields `items`, logging a progress bar with ETA every PROGRESS_EVERY_S seconds."""
  start = last = time.perf_counter()
  for done, item in enumerate(items, 1):
    yield item
    now = time.perf_counter()
    if now - last >= PROGRESS_EVERY_S and done < total:
      bar = '#' * (20 * done // total)
      eta = (now - start) / done * (total - done)
      logging.info(
        '%s [%-20s] %d/%d batches (%.0f%%), ETA %s',
        what,
        bar,
        done,
        total,
        100 * done / total,
        time.strftime('%H:%M:%S', time.gmtime(eta)),
      )
      last = now


# Metrics, on the host in float64.


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
