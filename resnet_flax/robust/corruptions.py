"""CIFAR-10-C's names and report: `eval.corruptions` parsed and checked, and the accuracy of a model on the
corrupted test images (`corruption_ops` makes them, `corruption_cache` keeps them).

The report (`report`, `--mode=evaluate --config.eval.corruptions=all`) scores `eval.corruption_examples`
test images, class-stratified (a shuffle by `eval.corruption_seed`, then the classes in turn), on each
corruption and severity with one compiled forward pass and no test-time augmentation. With
`eval.corruption_baseline` it adds Hendrycks' corruption error of each corruption relative to that
run's (CE_c = sum_s E_s,c / sum_s E_s,c(baseline), not normalised by AlexNet), their mean (mCE), and
the relative mCE (errors minus the clean error). The baseline is a report.json, or a workdir: of its
evaluations on the same data (its eval/index.json), the newest that scored the same images; a baseline
scored on other images is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from resnet_flax import data
from resnet_flax.data import DataError, ImageData
from resnet_flax.errors import ConfigError
from resnet_flax.robust import corruption_cache, corruption_ops
from resnet_flax.run import report_paths

REPORT_KEY = 'corruptions'


# Configuration.


def parse_names(value: str) -> tuple[str, ...]:
  """`eval.corruptions`: '' (none), 'all', or comma-separated names of `corruption_ops.CORRUPTIONS`, in the
  given order."""
  if value.strip() == 'all':
    return tuple(corruption_ops.CORRUPTIONS)
  names = tuple(name.strip() for name in value.split(',') if name.strip())
  unknown = [name for name in names if name not in corruption_ops.CORRUPTIONS]
  if unknown:
    raise ValueError(f'unknown corruptions {unknown}: choose all or some of {", ".join(corruption_ops.CORRUPTIONS)}')
  return names


def check_names(value: Any) -> str | None:
  """config_checks' rule for `eval.corruptions`."""
  if not isinstance(value, str):
    return "must be a string: '' (off), 'all' or comma-separated names"
  try:
    parse_names(value)
  except ValueError as e:
    return str(e)
  return None


# The report.

# evaluate.inference.forward: a split -> {'logits': [N, K]}.
Classify = Callable[[ImageData], dict[str, np.ndarray]]


def report(
  config: ml_collections.ConfigDict,
  split: ImageData,
  label_to_model: np.ndarray,
  classify: Classify,
) -> dict[str, Any]:
  """The `corruptions` entry of report.json (the evaluator `evaluate.corruption_evaluator` writes it): accuracy
  per corruption of `eval.corruptions` (not empty) and severity on the chosen test images, with `classify`'s
  one compiled forward pass (`label_to_model` maps the split's labels to the model's classes)."""
  names = parse_names(config.eval.corruptions)
  size = _check_images(split)
  start = time.perf_counter()
  indices = data.stratified_subset(split.labels, config.eval.corruption_examples, config.eval.corruption_seed)
  chosen = ImageData(split.images[indices], split.labels[indices], split.class_names)
  images_fingerprint = corruption_cache.fingerprint(chosen.images, indices)
  entry = _identity(config, indices, chosen, images_fingerprint, size)
  baseline = load_baseline(config, entry, names)
  targets = label_to_model[chosen.labels]
  accuracy_of = lambda images: float(
    np.mean(classify(ImageData(images, chosen.labels, chosen.class_names))['logits'].argmax(axis=1) == targets)
  )
  entry['clean_accuracy'] = accuracy_of(chosen.images)
  entry['accuracy'], generating = _accuracy_per_setting(
    config, names, chosen.images, indices, images_fingerprint, accuracy_of
  )
  entry.update(scores(entry['accuracy'], entry['clean_accuracy'], baseline))
  entry.update(seconds=time.perf_counter() - start, generation_seconds=generating)
  _log_summary(entry, baseline, len(indices))
  return entry


def _check_images(split: ImageData) -> int:
  """The size of the split's images, refused unless square RGB, with a warning unless CIFAR's."""
  size = split.images.shape[1]
  if split.images.shape[1] != split.images.shape[2] or split.images.shape[3] != 3:
    raise DataError(f'corruptions need square RGB images; the test images are {split.images.shape[1:]} (HxWxC)')
  if size != corruption_ops.CIFAR_SIZE:
    logging.warning(
      "Corruption constants are CIFAR-10-C's, for %d px images; these are %d px", corruption_ops.CIFAR_SIZE, size
    )
  return size


def _identity(
  config: ml_collections.ConfigDict, indices: np.ndarray, chosen: ImageData, images_fingerprint: str, size: int
) -> dict[str, Any]:
  """What makes the corrupted images of a report: `load_baseline` refuses a baseline whose identity differs."""
  return {
    'examples': len(indices),
    'selection': 'class-stratified: a shuffle by the seed, then the classes in turn',
    'seed': config.eval.corruption_seed,
    'generator_version': corruption_ops.GENERATOR_VERSION,
    'image_size': size,
    'images_sha256': hashlib.sha256(images_fingerprint.encode() + chosen.labels.tobytes()).hexdigest(),
  }


def _accuracy_per_setting(
  config: ml_collections.ConfigDict,
  names: Sequence[str],
  images: np.ndarray,
  indices: np.ndarray,
  images_fingerprint: str,
  accuracy_of: Callable[[np.ndarray], float],
) -> tuple[dict[str, list[float]], float]:
  """{name: accuracy at severities 1-5} of `images` corrupted (or read from the cache), each name's logged,
  and the seconds spent generating or loading the corrupted images."""
  accuracy, generating = {}, 0.0
  for name in names:
    named_start, accuracy[name] = time.perf_counter(), []
    for severity in corruption_ops.SEVERITIES:
      generation_start = time.perf_counter()
      corrupted = corruption_cache.load_or_corrupt(
        images,
        name,
        severity,
        config.eval.corruption_seed,
        config.eval.corruption_cache_dir,
        indices,
        images_fingerprint,
      )
      generating += time.perf_counter() - generation_start
      accuracy[name].append(accuracy_of(corrupted))
    logging.info(
      'Corruption %s: accuracy %s (%.1f s)',
      name,
      ' '.join(f'{a:.4f}' for a in accuracy[name]),
      time.perf_counter() - named_start,
    )
  return accuracy, generating


def _log_summary(entry: dict[str, Any], baseline: dict[str, Any] | None, examples: int):
  """The report's closing line: accuracies, the mCE with a baseline, and the time taken."""
  logging.info(
    'Corruptions: clean accuracy %.4f, mean corruption accuracy %.4f%s on %d images (%.0f s, %.0f s of which '
    'generating or loading them)',
    entry['clean_accuracy'],
    entry['mean_accuracy'],
    f', mCE {entry["mce"]} relative to {baseline["path"]}' if baseline else '',
    examples,
    entry['seconds'],
    entry['generation_seconds'],
  )


def scores(accuracy: dict[str, list[float]], clean_accuracy: float, baseline: dict[str, Any] | None) -> dict[str, Any]:
  """The mean corruption accuracy, each corruption's mean error and, with a baseline, Hendrycks' CE and
  relative CE of each corruption (None where the baseline's denominator is not positive) and their means."""
  errors = {name: [1 - a for a in values] for name, values in accuracy.items()}
  results = {
    'mean_accuracy': float(np.mean([a for values in accuracy.values() for a in values])),
    'errors': {name: float(np.mean(values)) for name, values in errors.items()},
  }
  if baseline is None:
    return results
  clean_error, baseline_clean_error = 1 - clean_accuracy, 1 - baseline['clean_accuracy']
  baseline_errors = {name: [1 - a for a in baseline['accuracy'][name]] for name in accuracy}
  ratio = lambda numerator, denominator: float(numerator / denominator) if denominator > 0 else None
  ce = {name: ratio(sum(errors[name]), sum(baseline_errors[name])) for name in accuracy}
  relative = {
    name: ratio(
      sum(e - clean_error for e in errors[name]), sum(e - baseline_clean_error for e in baseline_errors[name])
    )
    for name in accuracy
  }
  mean_of = lambda values: float(np.mean(values)) if None not in values else None
  return {
    **results,
    'baseline': baseline['path'],
    'ce': ce,
    'mce': mean_of(list(ce.values())),
    'relative_ce': relative,
    'relative_mce': mean_of(list(relative.values())),
  }


def load_baseline(
  config: ml_collections.ConfigDict, entry: dict[str, Any], names: Sequence[str]
) -> dict[str, Any] | None:
  """The corruption report of `eval.corruption_baseline` that scored the same images (`entry`'s identity) and
  every corruption of `names`: that report.json, or of that workdir's evaluations on the same data the newest
  such one (its eval/index.json, then a report of the old layout: `report_paths.report_files`); None without a
  baseline. Refused in one line, naming what it looked for, when none fits."""
  baseline = config.eval.corruption_baseline
  if not baseline:
    return None
  looked_in = baseline if os.path.isfile(baseline) else f'{report_paths.index_path(baseline)} and its reports'
  wanted = (
    f'a report of {", ".join(names)} on {report_paths.report_name(config.data)}, on the same '
    f'{entry["examples"]} images (seed {entry["seed"]}), in {looked_in}'
  )
  fix = (
    f'evaluate it with --mode=evaluate --workdir={baseline} --config.eval.corruptions=all '
    f'--config.eval.corruption_examples={entry["examples"]} --config.eval.corruption_seed={entry["seed"]} '
    'on the same data'
  )
  paths = [baseline] if os.path.isfile(baseline) else report_paths.report_files(baseline, config.data)
  scored = {path: section for path in paths if (section := _corruption_section(path)) is not None}
  if not scored:
    raise ConfigError(f'--config.eval.corruption_baseline={baseline}: looked for {wanted} and found none; {fix}')
  problems = {path: _mismatch(section, entry, names) for path, section in scored.items()}
  for path, problem in problems.items():
    if problem is None:
      return {**scored[path], 'path': os.path.abspath(path)}
  newest, problem = next(iter(problems.items()))
  raise ConfigError(
    f'--config.eval.corruption_baseline={baseline}: looked for {wanted}; none of its {len(problems)} corruption '
    f'reports fits, the newest, {newest}, {problem} {fix}'
  )


def _corruption_section(path: str) -> dict[str, Any] | None:
  try:
    with open(path) as f:
      return json.load(f).get(REPORT_KEY)
  except (OSError, ValueError, AttributeError) as e:
    raise ConfigError(f'--config.eval.corruption_baseline: {path} is not an evaluation report ({e!r})') from e


def _mismatch(scored: dict[str, Any], entry: dict[str, Any], names: Sequence[str]) -> str | None:
  """Why the corruption report `scored` cannot be the baseline of `entry`'s on `names`; None when it can."""
  differences = [
    f'{key} {str(scored.get(key))[:12]} here {str(entry[key])[:12]}'
    for key in ('examples', 'seed', 'generator_version', 'images_sha256')
    if scored.get(key) != entry[key]
  ]
  if differences:
    return (
      f'was scored on other corrupted images ({"; ".join(differences)}): score this run as it was '
      f'(--config.eval.corruption_examples={scored.get("examples")} --config.eval.corruption_seed='
      f'{scored.get("seed")}, the same data), or'
    )
  missing = [name for name in names if name not in scored['accuracy']]
  return f'lacks the corruptions {missing}:' if missing else None
