"""The serving backends: one `predict(uint8 [N, H, W, 3]) -> float32 probabilities [N, classes]` per runtime.

- `jax`: the checkpoint through `resnet_flax.load` (`api.Model.predict`: what `--mode=predict` runs).
- `onnx`, `tflite`, `tflite_int8`: the artifacts of `--mode=export` in `<workdir>/export/`, each through its
  own runtime (`formats.load_artifact`); `model_card.json` beside them says which classes, image size and
  resize policy they were made for. A missing artifact is a one-line error naming the command that makes
  it, unless `--export_missing` asks to make it here (`export.run_export`, which scores it on the run's test
  data and updates the card).
- `auto`: the fastest for one image on this machine, measured at start-up (the median of `TIMED_CALLS`
  calls after `WARMUP_CALLS`), among the float backends that can run here (`AUTO_CANDIDATES`); the
  figures are logged and `/v1/model` reports them. int8 is served only when named: its answers differ
  from the float model's on about 1% of images (the export's model card measures how many).

Whichever serves is warmed at every batch size the batcher sends (`batching.batch_sizes`), so that the
JAX backend compiles its log2(max_batch) + 1 programs before the server says it is ready.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import shlex
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import logging

from resnet_flax import models
from resnet_flax.deploy import api, export, formats
from resnet_flax.deploy.serving import batching
from resnet_flax.errors import ConfigError
from resnet_flax.models import trained

RUNTIMES = {'onnx': 'onnxruntime', 'tflite': 'ai_edge_litert', 'tflite_int8': 'ai_edge_litert'}  # Format: module.
AUTO_CANDIDATES = ('onnx', 'tflite', 'jax')
WARMUP_CALLS, TIMED_CALLS = 3, 20


@dataclasses.dataclass(frozen=True)
class ModelFacts:
  """What serving needs to know of the model behind a backend."""

  model: str
  class_names: tuple[str, ...]
  image_size: tuple[int, int]  # (height, width): any image is resized to it by resize_policy.
  resize_policy: str
  checkpoint_step: int


@dataclasses.dataclass(frozen=True)
class Backend:
  predict: batching.Predict
  facts: ModelFacts
  jax_model: api.Model | None = None  # The `jax` backend's model, which /v1/explain reuses.


def load_jax(workdir: str) -> Backend:
  model = api.load(workdir)
  info = model.restored.run.info
  facts = ModelFacts(info.model_name, model.class_names, model.image_size, model.resize_policy, model.step)
  return Backend(model.predict, facts, model)


def artifact_path(workdir: str, name: str) -> str:
  return os.path.join(workdir, export.EXPORT_DIR, formats.FORMATS[name].path)


def read_model_card(workdir: str) -> dict[str, Any] | None:
  """The export's model_card.json of `workdir`; None where there is none."""
  path = os.path.join(workdir, export.EXPORT_DIR, export.MODEL_CARD)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def load_artifact(name: str, workdir: str) -> Backend:
  card = read_model_card(workdir)
  if card is None:
    raise ConfigError(f'{workdir}/{export.EXPORT_DIR} has artifacts but no {export.MODEL_CARD}: export again')
  facts = ModelFacts(
    card['model'], tuple(card['class_names']), tuple(card['image_size']), card['resize_policy'], card['checkpoint_step']
  )
  return Backend(formats.load_artifact(name, artifact_path(workdir, name)), facts)


BACKENDS: dict[str, Callable[[str], Backend]] = {
  'jax': load_jax,
  **{name: functools.partial(load_artifact, name) for name in RUNTIMES},
}


# Before serving: what can serve, and what is missing.


def unavailable(workdir: str, name: str) -> str | None:
  """Why backend `name` cannot serve `workdir` (a package or its artifact missing); None where it can."""
  if name == 'jax':
    return None
  if importlib.util.find_spec(RUNTIMES[name]) is None:  # Looked up, not imported (TensorFlow stays out).
    return f'the {name} backend needs {RUNTIMES[name]}, not installed: {export.EXTRA}'
  if not os.path.exists(artifact_path(workdir, name)):
    return (
      f'{artifact_path(workdir, name)} does not exist: make it with {export_command(workdir, [name])}, '
      'or serve with --export_missing'
    )
  return None


def formats_to_export(workdir: str, names: Sequence[str]) -> list[str]:
  """`names` and the formats already exported: `--mode=export` removes the artifacts of formats it is not given."""
  present = [name for name in formats.FORMATS if os.path.exists(artifact_path(workdir, name))]
  return [name for name in formats.FORMATS if name in present or name in names]


def export_command(workdir: str, names: Sequence[str]) -> str:
  """The `--mode=export` command that makes formats `names` of `workdir` and keeps the others there."""
  chosen = ','.join(formats_to_export(workdir, names))
  return (
    f'python main.py --config=<the config it was trained with> --workdir={shlex.quote(workdir)} --mode=export '
    f'--export_formats={chosen}'
  )


def export_missing(workdir: str, names: Sequence[str]) -> None:
  """Exports formats `names` of `workdir` (re-exporting those already there, which the card lists), with the
  run's own config: its data calibrates int8 and scores every artifact."""
  config = trained.load_trained_run(workdir, _default_config()).config
  chosen = formats_to_export(workdir, names)
  logging.info('Exporting %s of %s (--export_missing)', ', '.join(chosen), workdir)
  export.run_export(config, workdir, chosen, command=export_command(workdir, names))


def prepare(workdir: str, backend: str, make_missing: bool) -> list[str]:
  """The backends to load for `backend` (a name; auto: every candidate that can serve), their missing artifacts
  exported first when `make_missing`; a named backend that cannot serve is a ConfigError saying why."""
  trained.load_trained_run(workdir, _default_config())  # A workdir without a trained run: one line, now.
  candidates = list(AUTO_CANDIDATES) if backend == 'auto' else [backend]
  absent = [name for name in candidates if name != 'jax' and not os.path.exists(artifact_path(workdir, name))]
  if make_missing and absent:
    export_missing(workdir, absent)
  reasons = {name: unavailable(workdir, name) for name in candidates}
  if backend != 'auto' and reasons[backend]:
    raise ConfigError(reasons[backend])
  for name, reason in reasons.items():
    if reason:
      logging.info('auto: not considering %s: %s', name, reason)
  return [name for name in candidates if not reasons[name]]


def _default_config():
  from configs import default  # The fields a run's config.json may predate.

  return default.get_config()


# Loading.


def batch_one_latency_ms(predict: batching.Predict, image_size: tuple[int, int]) -> float:
  """Median milliseconds of `predict` on one image, after warm-up calls."""
  image = np.zeros((1, *image_size, 3), np.uint8)
  for _ in range(WARMUP_CALLS):
    predict(image)
  seconds = []
  for _ in range(TIMED_CALLS):
    start = time.perf_counter()
    predict(image)
    seconds.append(time.perf_counter() - start)
  return 1000 * statistics.median(seconds)


def choose_fastest(workdir: str, candidates: Sequence[str]) -> tuple[str, Backend, dict[str, float]]:
  """The backend among `candidates` fastest for one image here, with every candidate's latency in ms."""
  latency, fastest = {}, None
  for name in candidates:
    backend = BACKENDS[name](workdir)
    latency[name] = batch_one_latency_ms(backend.predict, backend.facts.image_size)
    if fastest is None or latency[name] < latency[fastest[0]]:
      fastest = (name, backend)
  figures = ', '.join(f'{name} {ms:.3f} ms' for name, ms in sorted(latency.items(), key=lambda item: item[1]))
  logging.info('auto: one image takes %s (median of %d calls); serving with %s', figures, TIMED_CALLS, fastest[0])
  return fastest[0], fastest[1], latency


def warm(predict: batching.Predict, image_size: tuple[int, int], max_batch: int) -> None:
  """One call at every batch size the batcher sends: each program compiled, each buffer allocated."""
  for size in batching.batch_sizes(max_batch):
    predict(np.zeros((size, *image_size, 3), np.uint8))


def parameter_count(workdir: str) -> int:
  """Trainable parameters of the run's model, from its shapes (nothing is computed)."""
  run = trained.load_trained_run(workdir, _default_config())
  model = models.create_model_from_config(run.config, run.info.num_classes)
  return models.count_params(models.init_variables(model, run.info.image_shape)['params'])


@dataclasses.dataclass(frozen=True)
class Served:
  """The backend that serves, warmed, and what `/v1/model` says of it."""

  name: str
  backend: Backend
  card: dict[str, Any]


def load(workdir: str, backend: str, candidates: Sequence[str], max_batch: int) -> Served:
  """Backend `backend` (a name, or auto: the fastest of `candidates`, see `prepare`), warmed up to `max_batch`."""
  start = time.perf_counter()
  if backend == 'auto':
    name, chosen, latency = choose_fastest(workdir, candidates)
  else:
    name, chosen, latency = backend, BACKENDS[backend](workdir), {}
  warm(chosen.predict, chosen.facts.image_size, max_batch)
  seconds = time.perf_counter() - start
  logging.info('Serving %s with %s, warmed at batches up to %d, in %.1f s', workdir, name, max_batch, seconds)
  card = {
    **(read_model_card(workdir) or {}),
    **dataclasses.asdict(chosen.facts),
    'parameters': parameter_count(workdir),
    'backend': name,
    'backend_latency_ms': latency,
  }
  return Served(name, chosen, card)
