"""Rules for config fields, shared by the subpackages that own the fields.

A rule takes a field's value and returns None when it is valid, else what the value must be. Each
subpackage lists the rules of its own fields beside the registries that give their valid values (its
`CONFIG_RULES`), and `train.config_checks` composes them into the one check every command runs first.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import ml_collections

Rule = Callable[[Any], str | None]


def choice(options: Collection) -> Rule:
  """A value among `options`, read at check time: a registry (a dict) can grow after this module loads."""
  return lambda v: None if v in options else f'choose one of {", ".join(map(str, options))}'


BOOLEAN = choice((False, True))


def is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def positive(v) -> str | None:
  return None if is_number(v) and v > 0 else 'must be > 0'


def non_negative(v) -> str | None:
  return None if is_number(v) and v >= 0 else 'must be >= 0'


def whole_number(v) -> str | None:
  return None if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 'must be a whole number >= 0'


def fraction(v) -> str | None:
  return None if is_number(v) and 0 <= v < 1 else 'must be in [0, 1)'


def probability(v) -> str | None:
  return None if is_number(v) and 0 <= v <= 1 else 'must be in [0, 1]'


def get(config: ml_collections.ConfigDict, dotted: str):
  """The value of field `dotted` ('optim.learning_rate') of `config`."""
  value = config
  for part in dotted.split('.'):
    value = value[part]
  return value
