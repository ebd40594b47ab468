"""What memory the devices of this process have free: the other half of the memory check before the first
step (`train/memory.py` holds what the compiled steps need).

Hand-written because nothing at hand tells it whole: jax reports an accelerator's allocator
(`Device.memory_stats()`: its limit and what is in use) but nothing for a CPU, whose devices share the host's
RAM; there the bound is the smaller of what the host has free (`MemAvailable` in /proc/meminfo, which counts
reclaimable page cache as free) and what the process's cgroup still allows (a container's limit, which the
kernel's OOM killer enforces without a word). psutil would be a new dependency and still miss the cgroup.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

# (limit file, usage file, stat file, its key of inactive file pages), under a memory cgroup's directory.
CGROUP_FILES = {
  'v2': ('memory.max', 'memory.current', 'memory.stat', 'inactive_file'),
  'v1': ('memory.limit_in_bytes', 'memory.usage_in_bytes', 'memory.stat', 'total_inactive_file'),
}


@dataclasses.dataclass(frozen=True)
class Budget:
  """What the devices of this process may still allocate."""

  free: int  # Bytes: the host's for CPU devices (`shared`), else the least any one device has free.
  devices: int  # This process's devices.
  shared: bool  # CPU devices share the host's memory: each of them runs its own copy of a program.
  source: str  # Where `free` comes from, for messages.

  @property
  def per_device(self) -> int:
    return self.free // self.devices if self.shared else self.free


def meminfo_available(meminfo: Path) -> int | None:
  """`MemAvailable` of a /proc/meminfo file, in bytes; None where the file or the line is missing."""
  try:
    lines = meminfo.read_text().splitlines()
  except OSError:
    return None
  for line in lines:
    name, _, value = line.partition(':')
    if name == 'MemAvailable':
      return int(value.split()[0]) * 1024
  return None


def cgroup_available(directory: Path, version: str) -> int | None:
  """A memory cgroup's limit less its working set (its usage less the inactive file pages the kernel reclaims
  before the OOM killer acts), in bytes; None without a limit (v2) or without the files."""
  limit_file, usage_file, stat_file, inactive_key = CGROUP_FILES[version]
  try:
    limit = (directory / limit_file).read_text().strip()
    usage = int((directory / usage_file).read_text())
    stat = dict(line.split() for line in (directory / stat_file).read_text().splitlines() if line.strip())
  except (OSError, ValueError):
    return None
  if limit == 'max':  # v2's "no limit"; v1 writes a number near 2^63, which any other figure is below.
    return None
  return max(int(limit) - usage + int(stat.get(inactive_key, 0)), 0)


def cgroup_directories(root: Path) -> list[tuple[Path, str]]:
  """This process's memory cgroup directories, own first (cgroup v2, then v1), from `root`/proc/self/cgroup;
  the mount's top as well, which is the process's own in a container with a cgroup namespace."""
  mount = root / 'sys/fs/cgroup'
  candidates = [(mount, 'v2'), (mount / 'memory', 'v1')]
  try:
    lines = (root / 'proc/self/cgroup').read_text().splitlines()
  except OSError:
    lines = []
  for line in lines:
    _, controllers, path = line.split(':', 2)
    if controllers == '':
      candidates.insert(0, (mount / path.lstrip('/'), 'v2'))
    elif 'memory' in controllers.split(','):
      candidates.insert(0, (mount / 'memory' / path.lstrip('/'), 'v1'))
  return candidates


def host_available(root: Path = Path('/')) -> tuple[int, str] | None:
  """The memory the host lets this process still allocate, in bytes, and where that figure comes from: the
  smaller of /proc/meminfo's MemAvailable and the cgroup's limit less its use. None where neither is known."""
  figures = []
  available = meminfo_available(root / 'proc/meminfo')
  if available is not None:
    figures.append((available, 'MemAvailable in /proc/meminfo'))
  for directory, version in cgroup_directories(root):
    available = cgroup_available(directory, version)
    if available is not None:
      limit_file = CGROUP_FILES[version][0]
      figures.append((available, f"the cgroup's limit less its use, {directory / limit_file}"))
      break
  return min(figures) if figures else None


def accelerator_free(device: jax.Device) -> int | None:
  """Bytes the device's allocator can still hand out; None where it does not say."""
  stats = device.memory_stats() or {}
  if 'bytes_limit' not in stats:
    return None
  return stats['bytes_limit'] - stats.get('bytes_in_use', 0)


def budget(devices: Sequence[jax.Device]) -> Budget | None:
  """What `devices` (this process's) may still allocate, agreed by every process (the least of theirs, so they
  all decide alike); None where it cannot be told."""
  if devices[0].platform == 'cpu':
    host = host_available()
    found = None if host is None else Budget(host[0], len(devices), True, host[1])
  else:
    free = [accelerator_free(device) for device in devices]
    found = None if None in free else Budget(min(free), len(devices), False, f'{devices[0].device_kind} memory free')
  if jax.process_count() == 1:
    return found
  from jax.experimental import multihost_utils

  # In MiB: jax gathers int32 unless x64 is on.
  each = multihost_utils.process_allgather(np.int32(-1 if found is None else found.per_device // 2**20))
  if found is None or int(np.min(each)) < 0:
    return None
  return dataclasses.replace(found, free=int(np.min(each)) * 2**20 * (found.devices if found.shared else 1))
