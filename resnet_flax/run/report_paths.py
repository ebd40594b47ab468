"""Where an evaluation's report lives: `report_dir`, `<workdir>/eval/<report_name><suffix>/`, a name that
tells datasets apart (and a suffix the model served in int8 apart from the float one).

Part of the run contract, its one owner: evaluation writes there, and the corruption report reads a
baseline's `REPORT_FILE` from there.
"""

from __future__ import annotations

import hashlib
import json
import os

import ml_collections

REPORT_FILE = 'report.json'


def report_dir(workdir: str, data_config: ml_collections.ConfigDict, suffix: str = '') -> str:
  """`<workdir>/eval/<report_name(data_config)><suffix>`: the directory of the report on that data."""
  return os.path.join(workdir, 'eval', report_name(data_config) + suffix)


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
