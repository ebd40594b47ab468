"""`--mode=predict`: the top-k classes of each image in a list of files and folders, as a table and JSON."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from resnet_flax.data import DataError, folder
from resnet_flax.deploy import api
from resnet_flax.errors import ConfigError
from resnet_flax.train import config_checks


def predict(
  config: ml_collections.ConfigDict, workdir: str, paths: Sequence[str], top_k: int
) -> tuple[list[dict[str, Any]], int]:
  """The top-k classes with probabilities of each image in `paths` (files or folders), and the step."""
  config_checks.validate(config)
  files = image_files(paths)
  model = api.load(workdir, config.eval.checkpoint, config=config)
  probabilities = model.predict(files, tta=config.eval.tta)
  rows = []
  for path, p in zip(files, probabilities, strict=True):
    top = np.argsort(-p, kind='stable')[:top_k]
    rows.append({'path': path, 'top_k': [{'class': model.class_names[j], 'probability': float(p[j])} for j in top]})
  return rows, model.step


def image_files(paths: Sequence[str]) -> list[str]:
  """The files among `paths`, and the images under the folders among them (sorted, hidden ones skipped)."""
  if not paths:
    raise ConfigError('no images to predict: give files or folders with --predict_paths=a.png,dir/')
  files = []
  for path in paths:
    if not (os.path.isfile(path) or os.path.isdir(path)):
      raise DataError(f'{path} does not exist: give image files or folders with --predict_paths')
    files.extend(folder.expand_folder(path))
  return files


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
