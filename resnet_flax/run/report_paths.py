"""Where an evaluation's report lives, and the index of a workdir's evaluations. Part of the run contract, its
one owner: evaluation writes there, and the corruption report finds a baseline's `REPORT_FILE` there.

Each evaluation has a directory of its own, so that no evaluation's files replace another's:
`report_dir` is `<workdir>/eval/<data>-step<N>-<label>-<hash>/`, where `<data>` names the test data
(`<source>-<name or folder>-test`), `<N>` is the checkpoint's step, `<label>` says in a few characters
what was measured (`plain`, `tta-flip`, `pgd20-linf-eps8`, `c-all`, `int8-ptq`, joined by `_`; see
`evaluate.report.report_key`), and `<hash>` is that of what selects the data and of every setting that
changes the report's numbers (`Evaluation.settings`). Rerunning the identical evaluation rewrites its own
files and no others.

`<workdir>/eval/index.json` lists every evaluation of the workdir, oldest first: its directory, data, step,
label, settings, time (ISO 8601, UTC) and headline numbers. `record` adds an entry or replaces the one of the
same directory, keeping the others, and replaces the file atomically; `report_files` reads it back, newest first.

Reports written before the step and settings named the directory sit in `legacy_report_dir`
(`eval/<report_name>/`, int8 ones at `-int8-<mode>` beside it); the corruption baseline still finds them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import ml_collections

from resnet_flax.errors import ConfigError

REPORT_FILE = 'report.json'
INDEX_FILE = 'index.json'
EVAL_DIR = 'eval'
LABEL_LENGTH = 48  # A longer label is cut: the hash still tells the settings apart.


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """What tells one evaluation's report apart from another's of the same workdir and data."""

  step: int  # The checkpoint's step.
  label: str  # A few readable characters that say what was measured ('' = plain).
  settings: Mapping[str, Any]  # Every setting that changes the report's numbers, as JSON values.


def report_dir(workdir: str, data_config: ml_collections.ConfigDict, evaluation: Evaluation) -> str:
  """`<workdir>/eval/<data>-step<N>-<label>-<hash>`: the directory of that evaluation's report."""
  digest = _digest({'data': _data_identity(data_config), 'settings': evaluation.settings})
  label = _safe(evaluation.label or 'plain', '._+-')[:LABEL_LENGTH]
  return os.path.join(workdir, EVAL_DIR, f'{_data_label(data_config)}-step{evaluation.step}-{label}-{digest}')


def legacy_report_dir(workdir: str, data_config: ml_collections.ConfigDict) -> str:
  """`<workdir>/eval/<report_name(data_config)>`: where a float model's report went before the step and
  settings named the directory (each evaluation on that data replaced the one before)."""
  return os.path.join(workdir, EVAL_DIR, report_name(data_config))


def report_name(data_config: ml_collections.ConfigDict) -> str:
  """`<source>-<name or folder>-test-<hash>`: the hash of what selects the data keeps datasets apart. The
  index's `data` of an evaluation, and the name of its directory before the step and settings were added."""
  return f'{_data_label(data_config)}-{_digest(_data_identity(data_config))}'


def _data_identity(data_config: ml_collections.ConfigDict) -> dict[str, Any]:
  identity = {
    'source': data_config.source,
    'name': data_config.name,
    'path': os.path.abspath(os.path.expanduser(data_config.path)) if data_config.path else '',
  }
  if data_config.source == 'synthetic':
    identity.update({k: v for k, v in data_config.items() if k.startswith('synthetic_')})
  return identity


def _data_label(data_config: ml_collections.ConfigDict) -> str:
  """`<source>-<name or folder>-test`, readable."""
  path = _data_identity(data_config)['path']
  label = {'folder': os.path.basename(os.path.normpath(path)), 'synthetic': ''}.get(
    data_config.source, data_config.name
  )
  return '-'.join(part for part in (data_config.source, _safe(label, '._-'), 'test') if part)


def _safe(text: str, allowed: str) -> str:
  return ''.join(c if c.isalnum() or c in allowed else '_' for c in text)


def _digest(value: Any) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:8]


# The index.


def index_path(workdir: str) -> str:
  return os.path.join(workdir, EVAL_DIR, INDEX_FILE)


def record(
  workdir: str, data_config: ml_collections.ConfigDict, evaluation: Evaluation, headline: Mapping[str, float]
) -> dict[str, Any]:
  """Adds the evaluation whose report is in `report_dir(...)` to the index, with its `headline` numbers,
  replacing an entry of the same directory and keeping the others; returns the entry. Process 0 only."""
  entry = {
    'directory': os.path.basename(report_dir(workdir, data_config, evaluation)),
    'data': report_name(data_config),
    'step': evaluation.step,
    'label': evaluation.label or 'plain',
    'settings': dict(evaluation.settings),
    'time': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
    'headline': dict(headline),
  }
  path = index_path(workdir)
  with _locked(os.path.dirname(path)):
    entries = [e for e in _read_index(path) if e['directory'] != entry['directory']]
    with open(f'{path}.tmp', 'w') as f:
      json.dump({'evaluations': [*entries, entry]}, f, indent=2)
      f.write('\n')
    os.replace(f'{path}.tmp', path)  # A crash leaves the old index or the new one, never half of one.
  return entry


def report_files(workdir: str, data_config: ml_collections.ConfigDict) -> list[str]:
  """The report.json of every evaluation of `workdir` on that data, newest first: those of its index, then
  the one of `legacy_report_dir` where it exists."""
  data = report_name(data_config)
  indexed = [
    os.path.join(workdir, EVAL_DIR, e['directory'], REPORT_FILE)
    for e in reversed(_read_index(index_path(workdir)))
    if e['data'] == data
  ]
  legacy = os.path.join(legacy_report_dir(workdir, data_config), REPORT_FILE)
  return [path for path in [*indexed, legacy] if os.path.isfile(path)]


def _read_index(path: str) -> list[dict[str, Any]]:
  if not os.path.exists(path):
    return []
  try:
    with open(path) as f:
      entries = json.load(f)['evaluations']
    if not all(isinstance(e['directory'], str) for e in entries):
      raise TypeError('a directory that is not a string')
  except (ValueError, KeyError, TypeError) as e:
    raise ConfigError(f'{path} is not an index of evaluations ({e!r}): move it away (the reports stay)') from e
  return entries


@contextlib.contextmanager
def _locked(directory: str) -> Iterator[None]:
  """Holds an exclusive lock of `directory`: two evaluations of a workdir at once both stay in its index."""
  os.makedirs(directory, exist_ok=True)
  descriptor = os.open(directory, os.O_RDONLY)
  try:
    fcntl.flock(descriptor, fcntl.LOCK_EX)
    yield
  finally:
    os.close(descriptor)
