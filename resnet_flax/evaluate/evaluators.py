"""Evaluators chosen by config, as big_vision chooses them by type: each writes one section of report.json.

An evaluator measures something more than the core metrics of the one forward pass (accuracy under
attack, on corrupted images, ...) on the restored model and the test split. It is registered by name
(`register`), and that name is its section's key in report.json. Which run is chosen by config:
`eval.evaluators` names any registered ones ('' or comma-separated names, in that order), and a
built-in one also runs when the config field it registers as its `switch` is set (`eval.attacks` runs
`adversarial`, `eval.corruptions` runs `corruptions`, as they always have). `evaluate.evaluate_checkpoint`
checks them all before any work, runs each after the forward pass and draws their plots beside the report.
An evaluator also names the config fields that change its section (`settings`: the report's directory is
keyed by them), a short `label` for that directory's name, and the `headline` numbers of its section that
`eval/index.json` lists (`run.report_paths`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from jax.sharding import Mesh

from resnet_flax import config_fields
from resnet_flax.data import ImageData
from resnet_flax.errors import ConfigError
from resnet_flax.models import trained

Section = dict[str, Any]  # An evaluator's entry of report.json.


@dataclasses.dataclass(frozen=True)
class EvalContext:
  """What every evaluator gets: the restored model (its run's facts in `restored.run.info`) and the test split."""

  restored: trained.Restored  # The model as it serves: in int8 when `restored.quantized`.
  split: ImageData  # The test split, labels indexing `split.class_names`.
  label_to_model: np.ndarray  # The split's labels -> the model's class indices.
  config: ml_collections.ConfigDict  # The evaluation's config (its `eval.*` fields).
  mesh: Mesh  # The ('data',) mesh the restored variables are replicated over.


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """An entry of `EVALUATORS`."""

  evaluate: Callable[[EvalContext], Section]  # Its section of report.json, after the forward pass.
  check: Callable[[EvalContext], None] | None = None  # Raises ConfigError, before any work, on what it cannot measure.
  plot: Callable[[Section, str, str], None] | None = None  # (section, title, report directory): draws its figure.
  switch: str = ''  # A config field that, set, runs it unnamed in eval.evaluators ('': only when named).
  settings: tuple[str, ...] = ()  # The config fields that change its section: they key the report's directory.
  label: Callable[[ml_collections.ConfigDict], str] | None = None  # The directory's short label (None: its name).
  headline: Mapping[str, str] = dataclasses.field(default_factory=dict)  # index.json's number -> its section's key.


EVALUATORS: dict[str, Evaluator] = {}


def register(
  name: str,
  *,
  check: Callable[[EvalContext], None] | None = None,
  plot: Callable[[Section, str, str], None] | None = None,
  switch: str = '',
  settings: Sequence[str] = (),
  label: Callable[[ml_collections.ConfigDict], str] | None = None,
  headline: Mapping[str, str] | None = None,
) -> Callable[[Callable[[EvalContext], Section]], Callable[[EvalContext], Section]]:
  """Decorator: registers `evaluate(context) -> section` as the evaluator `name` (its key in report.json); the
  other arguments are `Evaluator`'s fields."""

  def add(evaluate: Callable[[EvalContext], Section]) -> Callable[[EvalContext], Section]:
    if name in EVALUATORS or not name.isidentifier():
      raise ValueError(f'Cannot register evaluator {name!r}: {"taken" if name in EVALUATORS else "not an identifier"}.')
    EVALUATORS[name] = Evaluator(evaluate, check, plot, switch, tuple(settings), label, dict(headline or {}))
    return evaluate

  return add


def named(value: str) -> list[str]:
  """The names of `eval.evaluators`: '' (none) or comma-separated."""
  return [name.strip() for name in value.split(',') if name.strip()]


def active(config: ml_collections.ConfigDict) -> dict[str, Evaluator]:
  """The evaluators the config runs, in order: those switched on (in registration order), then those named."""
  switched = [name for name, evaluator in EVALUATORS.items() if evaluator.switch and _is_set(config, evaluator)]
  names = dict.fromkeys([*switched, *named(config.eval.evaluators)])
  return {name: EVALUATORS[name] for name in names}


def _is_set(config: ml_collections.ConfigDict, evaluator: Evaluator) -> bool:
  return bool(config_fields.get(config, evaluator.switch))


def check_names(value: Any) -> str | None:
  """The rule of `eval.evaluators`: registered names, each once."""
  if not isinstance(value, str):
    return f"must be a string: '' (none) or comma-separated names of {', '.join(EVALUATORS)}"
  names = named(value)
  unknown = [name for name in names if name not in EVALUATORS]
  if unknown:
    return f'unknown evaluator {", ".join(unknown)}: the registered ones are {", ".join(EVALUATORS)}'
  repeated = sorted({name for name in names if names.count(name) > 1})
  return f'{", ".join(repeated)} named more than once' if repeated else None


def check_config(config: ml_collections.ConfigDict) -> None:
  """Refuses an `eval.evaluators` that names an unregistered evaluator, or one whose switch field is unset."""
  problem = check_names(config.eval.evaluators)
  if problem:
    raise ConfigError(f'--config.eval.evaluators={config.eval.evaluators!r} is invalid: {problem}')
  for name, evaluator in active(config).items():
    if evaluator.switch and not _is_set(config, evaluator):
      raise ConfigError(
        f'--config.eval.evaluators names {name}, which measures what --config.{evaluator.switch} chooses: '
        f'set that field (it alone runs {name})'
      )
