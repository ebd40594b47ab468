"""The records of a sweep: `sweep.json` (`SweepInfo`) and the configs it rebuilds, the Optuna storage and
study with its sampler and pruner, the baseline trial, and the directory of each trial's run."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import warnings
import zlib
from collections.abc import Mapping
from typing import Any

import ml_collections
import optuna
import sqlalchemy
from absl import flags, logging
from ml_collections import config_flags
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial

from resnet_flax.errors import ConfigError, UserError
from resnet_flax.sweep import search_space

SWEEP_JSON = 'sweep.json'
MAX_RETRIES = 3  # A trial whose workers keep dying is given up after this many retries.
PRUNER_STARTUP_TRIALS = 3  # Trials that finish before the median pruner may stop one.
PRUNER_WARMUP = 1 / 3  # No trial is stopped in this first fraction of its steps.


class StorageError(UserError):
  """The study's storage cannot be opened."""


@dataclasses.dataclass(frozen=True)
class SweepInfo:
  """What `sweep.json` records: enough to reopen the study and rebuild any trial's config."""

  workdir: str
  storage: str
  study_name: str
  config_file: str
  config_args: list[str]  # The sweep's --config.field=value overrides, as parsed.
  space_file: str

  def save(self):
    with open(os.path.join(self.workdir, SWEEP_JSON), 'w') as f:
      json.dump(dataclasses.asdict(self), f, indent=2)


def base_config(info: SweepInfo) -> ml_collections.ConfigDict:
  """The sweep's config file with its command-line overrides, parsed as main.py parses them."""
  argv = ['sweep', f'--config={info.config_file}', *info.config_args]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=flag_values, lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def trial_config(info: SweepInfo, params: Mapping[str, Any]) -> ml_collections.ConfigDict:
  return search_space.with_params(base_config(info), params)


def load_info(workdir: str) -> SweepInfo:
  path = os.path.join(workdir, SWEEP_JSON)
  if not os.path.exists(path):
    raise ConfigError(f'{path} does not exist: --report takes the --workdir of a sweep')
  with open(path) as f:
    return SweepInfo(**json.load(f))


def open_storage(url: str, heartbeat_seconds: int) -> optuna.storages.RDBStorage:
  """The RDB storage at `url`, with heartbeats, failing in seconds with one line when unreachable."""
  connect_args = {'connect_timeout': 10} if url.startswith('postgresql') else {'timeout': 60}
  try:
    with warnings.catch_warnings():  # Heartbeats are "experimental" since Optuna 2.9, and documented in 5.
      warnings.simplefilter('ignore', optuna.exceptions.ExperimentalWarning)
      return optuna.storages.RDBStorage(
        url,
        engine_kwargs={'connect_args': connect_args} if url.startswith(('postgresql', 'sqlite')) else None,
        heartbeat_interval=heartbeat_seconds,
        grace_period=2 * heartbeat_seconds,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES),
      )
  except ImportError as e:  # Optuna's, naming no module: the driver's own is its cause.
    driver = getattr(e.__cause__, 'name', None) or 'its database driver'
    raise StorageError(f"the storage {masked(url)} needs {driver}: pip install 'psycopg[binary]'") from None
  except (sqlalchemy.exc.SQLAlchemyError, ValueError, TypeError) as e:
    reason = ' '.join(str(getattr(e, 'orig', None) or e).split())[:300]
    raise StorageError(
      f'cannot open the study storage {masked(url)}: {reason}; check --storage '
      '(sqlite:///path/study.db on one machine, postgresql://user:password@host:port/database to share)'
    ) from None


def masked(url: str) -> str:
  """`url` without its password; a URL that does not parse shows only its start."""
  try:
    return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
  except Exception:
    return url.partition(':')[0] + ':***'


def sampler_seed(seed: int, study: optuna.Study) -> int:
  """`seed` mixed with this host, process and the trials so far: workers on several machines, and a rerun
  continuing the study, draw new values instead of repeating the first process's."""
  return zlib.crc32(f'{seed} {socket.gethostname()} {os.getpid()} {len(study.trials)}'.encode())


def create_sampler(name: str, space: Mapping[str, BaseDistribution], trials: int, seed: int):
  if name == 'grid':
    return optuna.samplers.GridSampler(search_space.grid(space), seed=seed)
  if name == 'random':
    return optuna.samplers.RandomSampler(seed=seed)
  return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, trials // 3)))


def create_pruner(name: str, warmup_steps: int):
  """Stops no trial before `warmup_steps`: early evaluations sit near chance and rank by noise."""
  if name == 'median':
    return optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=warmup_steps)
  if name == 'hyperband':
    return optuna.pruners.HyperbandPruner(min_resource=max(1, warmup_steps))
  return optuna.pruners.NopPruner()


def open_study(info: SweepInfo, sampler=None, pruner=None, heartbeat_seconds: int = 30, create: bool = False):
  """The sweep's study; `create`: a new one when the storage has none of that name."""
  storage = open_storage(info.storage, heartbeat_seconds)
  if not create:
    try:
      return optuna.load_study(study_name=info.study_name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
      raise ConfigError(f'{masked(info.storage)} holds no study {info.study_name!r}') from None
  return optuna.create_study(
    storage=storage,
    study_name=info.study_name,
    sampler=sampler,
    pruner=pruner,
    direction='maximize',
    load_if_exists=True,
  )


def enqueue_baseline(study: optuna.Study, space: Mapping[str, BaseDistribution], config: ml_collections.ConfigDict):
  """Queues the config's own values first, so that the report compares the best with them."""
  if study.trials:
    return
  params = {field: search_space.get_field(config, field) for field in space}
  outside = [f'{field}={value!r}' for field, value in params.items() if not search_space.contains(space[field], value)]
  if outside:
    logging.info('No baseline trial: the config has %s, outside the search space', ', '.join(outside))
    return
  study.enqueue_trial(params, user_attrs={'baseline': True}, skip_if_exists=True)


def workdir_name(trial: optuna.Trial | FrozenTrial) -> str:
  """`trial-<n>`; a retried or requeued trial inherits the directory (user attribute) of the one it repeats."""
  return trial.user_attrs.get('workdir', f'trial-{trial.number}')


def trial_workdir(info: SweepInfo, trial: FrozenTrial) -> str:
  return os.path.join(info.workdir, workdir_name(trial))


def check_same_sweep(info: SweepInfo) -> None:
  """A workdir holds one sweep: another study's trials would resume its trial directories."""
  if not os.path.exists(os.path.join(info.workdir, SWEEP_JSON)):
    return
  saved = load_info(info.workdir)
  fields = ('storage', 'study_name', 'config_file', 'config_args', 'space_file')
  changed = [field for field in fields if getattr(saved, field) != getattr(info, field)]
  if changed:
    raise ConfigError(
      f'{info.workdir} holds the sweep {saved.study_name!r} with another {", ".join(changed)}; '
      'rerun it with the same flags, or give a new --workdir'
    )


def absolute_storage(url: str) -> str:
  """A SQLite URL with an absolute path: `--report` and the workers may run from another directory."""
  prefix = 'sqlite:///'
  if url.startswith(prefix) and not url.startswith(prefix + '/') and ':memory:' not in url:
    return prefix + os.path.abspath(url[len(prefix) :])
  return url
