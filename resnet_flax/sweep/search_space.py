"""The search space of a sweep: the `get_space()` file, its checks against the config (before any training),
the trial configs it gives, the values of the grid sampler, and suggesting a trial's values."""

from __future__ import annotations

import copy
import difflib
import functools
import runpy
from collections.abc import Mapping
from typing import Any

import ml_collections
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from resnet_flax import cli
from resnet_flax.errors import ConfigError
from resnet_flax.train import config_checks


def load_space(path: str) -> dict[str, BaseDistribution]:
  """`get_space()` of the Python file at `path`: {config field: optuna distribution}."""
  try:
    space = runpy.run_path(path)['get_space']()
  except FileNotFoundError:
    raise ConfigError(f'--space file {path} does not exist') from None
  except KeyError:
    raise ConfigError(f'--space file {path} defines no get_space()') from None
  except Exception as e:
    raise ConfigError(f'the --space file failed to load: {cli.where_it_failed(e)}') from None
  if not isinstance(space, Mapping) or not space:
    raise ConfigError(f'get_space() of {path} must return a non-empty dict of config field -> optuna distribution')
  for field, distribution in space.items():
    if not isinstance(distribution, BaseDistribution):
      raise ConfigError(
        f'get_space() of {path}: {field!r} maps to {distribution!r}; use optuna.distributions.FloatDistribution, '
        'IntDistribution or CategoricalDistribution'
      )
  return dict(space)


def leaf_fields(config: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  fields = []
  for key, value in config.items():
    path = f'{prefix}{key}'
    fields += leaf_fields(value, f'{path}.') if isinstance(value, ml_collections.ConfigDict) else [path]
  return fields


def get_field(config: ml_collections.ConfigDict, field: str) -> Any:
  return functools.reduce(getattr, field.split('.'), config)


def with_params(config: ml_collections.ConfigDict, params: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with each `field: value` of `params` set (ConfigDict checks the types)."""
  config = copy.deepcopy(config)
  for field, value in params.items():
    *parents, name = field.split('.')
    setattr(functools.reduce(getattr, parents, config), name, value)
  return config


def extremes(distribution: BaseDistribution) -> list[Any]:
  if isinstance(distribution, CategoricalDistribution):
    return list(distribution.choices)
  return [distribution.low, distribution.high]


def check_space(space: Mapping[str, BaseDistribution], config: ml_collections.ConfigDict) -> None:
  """Every field exists, and the config validates at every end of every range (before any training)."""
  fields = leaf_fields(config)
  for field, distribution in space.items():
    if field not in fields:
      close = difflib.get_close_matches(field, fields, n=1)
      hint = f'; did you mean {close[0]!r}?' if close else ' (configs/default.py lists every field)'
      raise ConfigError(f'the search space names config field {field!r}, which does not exist{hint}')
    for value in extremes(distribution):
      try:
        config_checks.validate(with_params(config, {field: value}))
      except (TypeError, ValueError) as e:
        raise ConfigError(f'the search space gives {field}={value!r}, which the config refuses: {e}') from None


def grid(space: Mapping[str, BaseDistribution]) -> dict[str, list[Any]]:
  """The values the grid sampler walks: choices, or a range with a step."""
  values = {}
  for field, distribution in space.items():
    if isinstance(distribution, CategoricalDistribution):
      values[field] = list(distribution.choices)
    elif getattr(distribution, 'step', None):
      count = round((distribution.high - distribution.low) / distribution.step) + 1
      values[field] = [distribution.low + i * distribution.step for i in range(count)]
    else:
      raise ConfigError(f'--sampler=grid needs choices or a step for {field}: give its distribution a step= or choices')
  return values


def suggest(trial: optuna.Trial, field: str, distribution: BaseDistribution) -> Any:
  if isinstance(distribution, FloatDistribution):
    return trial.suggest_float(field, distribution.low, distribution.high, step=distribution.step, log=distribution.log)
  if isinstance(distribution, IntDistribution):
    return trial.suggest_int(field, distribution.low, distribution.high, step=distribution.step, log=distribution.log)
  return trial.suggest_categorical(field, distribution.choices)


def contains(distribution: BaseDistribution, value: Any) -> bool:
  if isinstance(distribution, CategoricalDistribution):
    return value in distribution.choices
  return distribution.low <= value <= distribution.high
