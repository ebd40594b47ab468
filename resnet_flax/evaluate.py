"""Evaluation reports and predictions from the checkpoints of a workdir.

`evaluate_checkpoint` restores one checkpoint (best, latest or a step), runs one jitted forward
pass sharded over the ('data',) mesh on every example of the test split exactly once (padded,
masked batches), and computes the report on the host in float64 numpy, so the same checkpoint
gives the identical report on any number of devices. It writes `<workdir>/eval/<name>/`:
`report.json`, `confusion_matrix.png`, `per_class.png`; and `<workdir>/training_curves.png`.

Classes are matched by name: the evaluated data may hold a subset or a reordering of the model's
classes. Predictions are over all the model's classes (predicting a class the data lacks is an
error). The confusion matrix counts images of `class_names[i]` (the data's classes, rows)
predicted as `predicted_class_names[j]` (the model's classes: the data's classes first, in the
same order, then those the data lacks), so its diagonal holds the correct predictions and its
trace / num_examples is the accuracy.

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
import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_flax import augment, checkpoint, config_checks, data, input_pipeline, models, plots, train
from resnet_flax.data import DataError, ImageData, folder
from resnet_flax.errors import ConfigError

ECE_BINS = 15
TOP_K = 5  # Top-5 accuracy is reported for models with more than 5 classes.
PROGRESS_EVERY_S = 5.0  # An evaluation logs its progress this often, so short ones stay quiet.
# View = (mirror left-right, diagonal shift in pixels).
TTA_VIEWS: dict[str, tuple[tuple[bool, int], ...]] = {
  'none': ((False, 0),),
  'flip': ((False, 0), (True, 0)),
  'flip+translate': tuple((flip, shift) for shift in (0, 1, -1) for flip in (False, True)),
}
# run.json keys that spare deriving these facts from the training data.
RUN_FACTS = ('class_names', 'pixel_mean', 'pixel_std', 'steps_per_epoch')


@dataclasses.dataclass(frozen=True)
class TrainedRun:
  """What evaluation needs to know about the run that made a workdir's checkpoints."""

  config: ml_collections.ConfigDict  # The run's config (config.json): the model and optimizer to rebuild.
  class_names: tuple[str, ...]  # Model output i is class_names[i].
  image_shape: tuple[int, ...]
  pixel_mean: tuple[float, ...]  # Normalization of the training images.
  pixel_std: tuple[float, ...]
  steps_per_epoch: int


@dataclasses.dataclass(frozen=True)
class Restored:
  run: TrainedRun
  model: models.ResNet
  variables: dict[str, Any]  # {'params', 'batch_stats'}, replicated over the mesh.
  step: int


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Evaluates a checkpoint of `workdir` on the test split `config.data` selects; returns the report."""
  config_checks.validate(config)
  with contextlib.closing(open_checkpoints(workdir)) as manager:
    step = choose_step(manager, config.eval.checkpoint)
    run = load_trained_run(workdir, config)
    split = load_test_split(config.data, run)
    label_to_model = model_indices(split.class_names, run.class_names)
    mesh = train.create_mesh()
    restored = restore(manager, run, step, mesh)
  start = time.perf_counter()
  outputs = forward(restored, split, config.eval_batch_size, config.eval.tta, mesh)
  logging.info('Evaluated %d images in %.1f s', len(split), time.perf_counter() - start)
  report = {
    'workdir': os.path.abspath(workdir),
    'checkpoint': config.eval.checkpoint,
    'checkpoint_step': restored.step,
    'data': {'source': config.data.source, 'name': config.data.name, 'path': config.data.path, 'split': 'test'},
    **build_report(outputs, split.labels, label_to_model, split.class_names, run.class_names),
    **tta_report(outputs, split.labels, label_to_model, config.eval.tta),
  }
  directory = os.path.join(workdir, 'eval', report_name(config.data))
  if jax.process_index() == 0:
    write_report(report, directory)
    plots.write_training_curves(workdir, run.steps_per_epoch)
  tta = f', TTA ({config.eval.tta}) {report["tta_accuracy"]:.4f}' if 'tta_accuracy' in report else ''
  logging.info(
    'Step %d: accuracy %.4f%s, loss %.4f on %d images; report in %s',
    restored.step,
    report['accuracy'],
    tta,
    report['loss'],
    report['num_examples'],
    directory,
  )
  return report


# Restoring.


def load_trained_run(workdir: str, config: ml_collections.ConfigDict) -> TrainedRun:
  """Reads config.json and run.json; what run.json lacks comes from the training data of config.json.

  config.json overrides `config` (the current one): a field added to the code after the run was
  saved keeps its value from `config` (usually its default) instead of failing.
  """
  paths = [os.path.join(workdir, name) for name in ('config.json', 'run.json')]
  if not all(os.path.isfile(path) for path in paths):
    raise ConfigError(
      f'{workdir} holds no trained run (config.json and run.json are missing): '
      f'train one with --mode=train --workdir={workdir}, or point --workdir at a trained run'
    )
  config = ml_collections.ConfigDict(config.to_dict())
  with open(paths[0]) as f:
    config.update(json.load(f))
  with open(paths[1]) as f:
    saved = json.load(f)
  image_shape = tuple(saved['image_shape'])
  if all(key in saved for key in RUN_FACTS):
    return TrainedRun(
      config,
      tuple(saved['class_names']),
      image_shape,
      tuple(saved['pixel_mean']),
      tuple(saved['pixel_std']),
      saved['steps_per_epoch'],
    )
  logging.info('%s lacks %s: deriving them from the training data named in config.json', paths[1], ', '.join(RUN_FACTS))
  train_split = data.load_splits(config.data)['train']
  if len(train_split.class_names) != saved['num_classes']:
    raise DataError(
      f'the training data of {workdir} ({config.data.source} {config.data.path!r}) now has '
      f'{len(train_split.class_names)} classes but the checkpoints have {saved["num_classes"]}: '
      'restore the data the model was trained on'
    )
  mean, std = augment.channel_stats(train_split.images)
  return TrainedRun(config, train_split.class_names, image_shape, mean, std, len(train_split) // config.batch_size)


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


def choose_step(manager: ocp.CheckpointManager, choice: str) -> int:
  """The step of `choice`: 'best' (by eval accuracy; the latest if none has metrics), 'latest' or a step."""
  steps = manager.all_steps()
  if choice == 'latest':
    return max(steps)
  if choice == 'best':
    best = checkpoint.best_step(manager)
    if best is None:
      logging.info('No checkpoint has eval metrics: evaluating the latest, step %d', max(steps))
      return max(steps)
    return best
  if int(choice) not in steps:
    raise ConfigError(
      f'there is no checkpoint of step {choice} in {manager.directory}; it has steps '
      f'{sorted(steps)}: choose one of them, best or latest with --config.eval.checkpoint'
    )
  return int(choice)


def restore(manager: ocp.CheckpointManager, run: TrainedRun, step: int, mesh: Mesh) -> Restored:
  """Restores checkpoint `step` into an abstract TrainState of the saved config, replicated over `mesh`.

  The state is built as `train.train_and_evaluate` builds it; evaluation uses its `eval_variables`
  (the EMA of the weights when training kept one), as the evaluation during training does.
  """
  config = run.config
  model = train.create_model(config, len(run.class_names))
  tx = train.create_optimizer(config, train.create_learning_rate_fn(config, run.steps_per_epoch))
  abstract = jax.eval_shape(
    lambda variables: train.create_train_state(model, variables, tx, ema=config.ema_decay > 0),
    models.init_variables(model, run.image_shape),
  )
  replicated = NamedSharding(mesh, P())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract)
  state = checkpoint.restore(manager, abstract, step)
  return Restored(run, model, state.eval_variables(), step)


# Data.


def load_test_split(data_config: ml_collections.ConfigDict, run: TrainedRun) -> ImageData:
  """The true test split (also when `data.validation_size` holds out a validation split)."""
  splits = data.load_splits(data_config)
  split = splits.get('heldout_test', splits['test'])
  check_image_shape(split.images.shape[1:], run.image_shape, f'the test split of data.source={data_config.source}')
  return split


def check_image_shape(shape: Sequence[int], model_shape: Sequence[int], what: str):
  if tuple(shape) != tuple(model_shape):
    raise DataError(
      f'{what}: {"x".join(map(str, shape))} (HxWxC) images, but the model was trained on '
      f'{"x".join(map(str, model_shape))}: resize them beforehand'
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


def report_name(data_config: ml_collections.ConfigDict) -> str:
  """`<source>-<name or folder>-test-<hash>`: the hash of what selects the data keeps datasets apart."""
  identity = {
    'source': data_config.source,
    'name': data_config.name,
    'path': os.path.abspath(os.path.expanduser(data_config.path)) if data_config.path else '',
  }
  if data_config.source == 'synthetic':
    identity.update({k: v for k, v in data_config.items() if k.startswith('synthetic_')})
  digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
  label = {'folder': os.path.basename(os.path.normpath(identity['path'])), 'synthetic': ''}.get(
    data_config.source, data_config.name
  )
  safe_label = ''.join(c if c.isalnum() or c in '._-' else '_' for c in label)
  return '-'.join(part for part in (data_config.source, safe_label, 'test', digest) if part)


# The forward pass.


def view(images: jax.Array, flip: bool, shift: int) -> jax.Array:
  """uint8 [B, H, W, C] mirrored and/or moved `shift` pixels down and right (reflect padding)."""
  if shift:
    height, width = images.shape[1:3]
    padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='reflect')
    images = padded[:, 1 - shift : 1 - shift + height, 1 - shift : 1 - shift + width]
  return images[:, :, ::-1] if flip else images


def forward_views(
  variables, images: jax.Array, *, model: models.ResNet, mean, std, views: tuple[tuple[bool, int], ...]
) -> dict[str, jax.Array]:
  """Logits of the plain images and, with several views, the mean softmax over the views."""
  logits = [model.apply(variables, augment.normalize(view(images, *v), mean, std), train=False) for v in views]
  outputs = {'logits': logits[0]}
  if len(views) > 1:
    outputs['tta_probabilities'] = jnp.mean(jnp.stack([jax.nn.softmax(l) for l in logits]), axis=0)
  return outputs


def forward(restored: Restored, split: ImageData, batch_size: int, tta: str, mesh: Mesh) -> dict[str, np.ndarray]:
  """Per-example outputs of `forward_views` for every example of `split` once, in order, on the host."""
  forward_fn = jax.jit(
    lambda variables, images: forward_views(
      variables,
      images,
      model=restored.model,
      mean=restored.run.pixel_mean,
      std=restored.run.pixel_std,
      views=TTA_VIEWS[tta],
    ),
    in_shardings=(NamedSharding(mesh, P()), input_pipeline.data_sharding(mesh)),
    out_shardings=NamedSharding(mesh, P()),
  )
  sharding, local = input_pipeline.data_sharding(mesh), input_pipeline.process_slice(batch_size)
  batches = input_pipeline.padded_batches(split, batch_size)
  collected = []
  for batch in with_progress(batches, -(-len(split) // batch_size), 'evaluation'):
    images = jax.make_array_from_process_local_data(sharding, batch['image'][local])
    real = batch['mask'] > 0
    collected.append({k: v[real] for k, v in jax.device_get(forward_fn(restored.variables, images)).items()})
  return {k: np.concatenate([c[k] for c in collected]) for k in collected[0]}


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


# The report.


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


def build_report(
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
      'class_names': list(class_names),
      'predicted_class_names': [model_class_names[j] for j in columns],
      'confusion_matrix': matrix.tolist(),
    }
  )
  return report


def tta_report(
  outputs: dict[str, np.ndarray], labels: np.ndarray, label_to_model: np.ndarray, tta: str
) -> dict[str, Any]:
  report = {'tta': tta}
  if 'tta_probabilities' in outputs:
    predictions = outputs['tta_probabilities'].argmax(axis=1)
    report.update(
      {'tta_views': len(TTA_VIEWS[tta]), 'tta_accuracy': float(np.mean(predictions == label_to_model[labels]))}
    )
  return report


def write_report(report: dict[str, Any], directory: str):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'report.json'), 'w') as f:
    f.write(report_json(report))
  title = f'{os.path.basename(directory)}, step {report["checkpoint_step"]}'
  plots.plot_confusion_matrix(report, title, os.path.join(directory, 'confusion_matrix.png'))
  plots.plot_per_class(report, title, os.path.join(directory, 'per_class.png'))


def report_json(report: dict[str, Any]) -> str:
  """Indented JSON with one line per confusion matrix row (a 100-class matrix stays readable)."""
  rows = ',\n    '.join(json.dumps(row) for row in report['confusion_matrix'])
  text = json.dumps({**report, 'confusion_matrix': '<rows>'}, indent=2)
  return text.replace('"<rows>"', f'[\n    {rows}\n  ]') + '\n'


# Prediction.


def predict(
  config: ml_collections.ConfigDict, workdir: str, paths: Sequence[str], top_k: int
) -> tuple[list[dict[str, Any]], int]:
  """The top-k classes with probabilities of each image in `paths` (files or folders), and the step."""
  config_checks.validate(config)
  files = image_files(paths)
  with contextlib.closing(open_checkpoints(workdir)) as manager:
    step = choose_step(manager, config.eval.checkpoint)
    run = load_trained_run(workdir, config)
    images = folder.decode_images(files, files[0])
    check_image_shape(images.shape[1:], run.image_shape, files[0])
    mesh = train.create_mesh()
    restored = restore(manager, run, step, mesh)
  batch_size = min(config.eval_batch_size, -(-len(files) // jax.device_count()) * jax.device_count())
  split = ImageData(images, np.zeros(len(files), np.int32), run.class_names)
  outputs = forward(restored, split, batch_size, config.eval.tta, mesh)
  tta_probabilities = outputs.get('tta_probabilities')
  probabilities = np.exp(log_softmax(outputs['logits'])) if tta_probabilities is None else tta_probabilities
  rows = []
  for path, p in zip(files, probabilities, strict=True):
    top = np.argsort(-p, kind='stable')[:top_k]
    rows.append({'path': path, 'top_k': [{'class': run.class_names[j], 'probability': float(p[j])} for j in top]})
  return rows, restored.step


def image_files(paths: Sequence[str]) -> list[str]:
  """The files among `paths`, and the images under the folders among them (sorted, hidden ones skipped)."""
  if not paths:
    raise ConfigError('no images to predict: give files or folders with --predict_paths=a.png,dir/')
  files = []
  for path in paths:
    if os.path.isfile(path):
      files.append(path)
    elif os.path.isdir(path):
      files.extend(images_under(path))
    else:
      raise DataError(f'{path} does not exist: give image files or folders with --predict_paths')
  return files


def images_under(directory: str) -> list[str]:
  found = []
  for root, dirs, names in os.walk(directory):
    dirs[:] = [d for d in dirs if not d.startswith('.')]
    found += [
      os.path.join(root, name)
      for name in names
      if name.lower().endswith(folder.IMAGE_EXTENSIONS) and not name.startswith('.')
    ]
  if not found:
    raise DataError(f'{directory} has no {"/".join(folder.IMAGE_EXTENSIONS)} images: give another folder')
  return sorted(found)


def predictions_table(rows: list[dict[str, Any]]) -> str:
  width = max(len('image'), *(len(row['path']) for row in rows))
  header = f'{"image":{width}}  ' + '  '.join(f'{f"top-{i + 1}":19}' for i in range(len(rows[0]['top_k'])))
  lines = [
    f'{row["path"]:{width}}  ' + '  '.join(f'{t["class"][:13]:13} {t["probability"]:.3f}' for t in row['top_k'])
    for row in rows
  ]
  return '\n'.join([header.rstrip(), *lines])


def run_predict(
  config: ml_collections.ConfigDict, workdir: str, paths: Sequence[str], top_k: int, output: str | None
) -> list[dict[str, Any]]:
  """`predict`, then the table on stdout and the JSON in `output` (default <workdir>/predictions.json)."""
  rows, step = predict(config, workdir, paths, top_k)
  if jax.process_index() == 0:
    print(predictions_table(rows))
    output = output or os.path.join(workdir, 'predictions.json')
    with open(output, 'w') as f:
      json.dump(
        {'workdir': os.path.abspath(workdir), 'checkpoint_step': step, 'tta': config.eval.tta, 'predictions': rows},
        f,
        indent=2,
      )
    logging.info('Wrote %d predictions to %s', len(rows), output)
  return rows
