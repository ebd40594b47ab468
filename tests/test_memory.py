"""The memory check before the first step (train/memory.py, run/device_memory.py) and the one line for an
out-of-memory error that still happens (cli.py)."""

import logging
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import smoke
from resnet_flax.data import input_pipeline
from resnet_flax.errors import OutOfMemoryError
from resnet_flax.run import device_memory
from resnet_flax.train import memory, step, trainer

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30


def fake_host(root: Path, mem_available_kb: int, cgroup: dict[str, str], self_cgroup: str = '0::/\n') -> Path:
  """A directory standing for `/`: proc/meminfo, proc/self/cgroup and the cgroup files (path under sys/fs/cgroup
  -> content)."""
  (root / 'proc/self').mkdir(parents=True)
  (root / 'proc/meminfo').write_text(
    f'MemTotal:       99999999 kB\nMemFree:         1000 kB\nMemAvailable:   {mem_available_kb} kB\n'
  )
  (root / 'proc/self/cgroup').write_text(self_cgroup)
  for name, content in cgroup.items():
    path = root / 'sys/fs/cgroup' / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
  return root


def test_host_memory_is_the_smaller_of_mem_available_and_the_cgroups_limit_less_its_working_set(tmp_path):
  cgroup_v2 = {'memory.max': f'{4 * GIB}\n', 'memory.current': f'{3 * GIB}\n', 'memory.stat': f'inactive_file {GIB}\n'}
  root = fake_host(tmp_path / 'v2', 8 * 2**20, cgroup_v2)
  available, source = device_memory.host_available(root)
  assert available == 2 * GIB and 'memory.max' in source  # 4 GiB limit - (3 GiB used - 1 GiB reclaimable).
  cgroup_v1 = {
    'memory/job/memory.limit_in_bytes': f'{16 * GIB}\n',
    'memory/job/memory.usage_in_bytes': f'{GIB}\n',
    'memory/job/memory.stat': 'cache 5\ntotal_inactive_file 0\n',
  }
  root = fake_host(tmp_path / 'v1', 8 * 2**20, cgroup_v1, self_cgroup='4:memory:/job\n0::/\n')
  assert device_memory.host_available(root) == (8 * GIB, 'MemAvailable in /proc/meminfo')  # The smaller.
  smaller_limit = cgroup_v1 | {'memory/job/memory.limit_in_bytes': f'{3 * GIB}'}
  root = fake_host(tmp_path / 'v1_small', 8 * 2**20, smaller_limit, self_cgroup='4:memory:/job\n0::/\n')
  assert device_memory.host_available(root)[0] == 2 * GIB


def test_host_memory_without_a_cgroup_limit_is_mem_available(tmp_path):
  unlimited = {
    'memory.max': 'max\n',
    'memory.current': '5\n',
    'memory.stat': '',
    'memory/memory.limit_in_bytes': '9223372036854771712',  # cgroup v1's "no limit".
    'memory/memory.usage_in_bytes': '5',
    'memory/memory.stat': 'total_inactive_file 0\n',
  }
  root = fake_host(tmp_path, 3 * 2**20, unlimited)
  assert device_memory.host_available(root) == (3 * GIB, 'MemAvailable in /proc/meminfo')
  assert device_memory.host_available(tmp_path / 'nothing') is None


def test_an_accelerators_budget_is_the_least_any_device_has_free():
  def device(limit, in_use):
    stats = {'bytes_limit': limit, 'bytes_in_use': in_use}
    return types.SimpleNamespace(platform='gpu', device_kind='NVIDIA H100', memory_stats=lambda: stats)

  budget = device_memory.budget([device(80 * GIB, 10 * GIB), device(80 * GIB, 30 * GIB)])
  assert (budget.free, budget.per_device, budget.shared) == (50 * GIB, 50 * GIB, False)
  cpu = device_memory.budget(jax.local_devices())
  assert cpu.shared and cpu.per_device == cpu.free // jax.local_device_count() > 0


def test_several_processes_agree_on_the_least_memory_free(monkeypatch):
  from jax.experimental import multihost_utils

  gathered = []

  def allgather(value):  # This process's figure, and another process's 1 GiB per device.
    gathered.append(value)
    return np.stack([value, np.int32(1024)])

  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(multihost_utils, 'process_allgather', allgather)
  budget = device_memory.budget(jax.local_devices())
  assert budget.per_device == GIB and budget.free == GIB * jax.local_device_count()
  assert gathered[0].dtype == np.int32 and 1024 < gathered[0] < 2**31  # In MiB: jax gathers int32 without x64.


def test_largest_batch_follows_the_line_through_two_analyses():
  analysed = []

  def need_at(batch):
    analysed.append(batch)
    return 1000 + 10 * batch

  assert memory.largest_batch(need_at, 512, free=3000, multiple=8) == 200  # 1000 + 10 * 200 = 3000.
  assert len(analysed) == 3 and analysed[0] == 512 and analysed[1] == analysed[2] < 512  # Two batch sizes.
  assert memory.largest_batch(need_at, 512, free=500, multiple=8) == 0  # Not even 8 fits.
  assert memory.largest_batch(need_at, 8, free=500, multiple=8) == 0


@pytest.fixture(scope='module')
def tiny_needs(tmp_path_factory):
  """The smoke config's set-up and its steps' needs (compiled as training compiles them)."""
  config = smoke.get_config()
  setup = trainer.set_up(config, str(tmp_path_factory.mktemp('memory')))
  train_fn, eval_fn = step.jit_steps(setup.spec, setup.mesh, setup.hparams)
  return config, memory.StepNeeds(setup, train_fn, eval_fn, setup.state, 1, config.eval_batch_size)


def small_budget(monkeypatch, free: int):
  budget = device_memory.Budget(free, jax.local_device_count(), True, 'a test')
  monkeypatch.setattr(device_memory, 'budget', lambda devices: budget)


def test_the_check_refuses_in_one_line_naming_a_smaller_batch_that_fits(tiny_needs, monkeypatch):
  config, needs = tiny_needs
  assert needs.train(32) < needs.train(64)
  free = (needs.train(32) + needs.train(64)) // 2
  small_budget(monkeypatch, free * jax.local_device_count())
  with pytest.raises(OutOfMemoryError) as refused:
    memory.check_steps_fit(config, needs)
  message = str(refused.value)
  assert '\n' not in message and 'the train step needs' in message and 'resnet_tiny' in message
  assert '32x32 images at --config.batch_size=64' in message
  assert 'image_size' not in message and 'stem' not in message.split('fixes:')[1]  # Nothing to gain at CIFAR's size.
  largest = int(message.split('--config.batch_size=')[2].split()[0])
  assert 32 <= largest < 64 and needs.train(largest) <= free  # The batch named fits, and none below 32 is named.
  small_budget(monkeypatch, 100 * GIB)
  memory.check_steps_fit(config, needs)  # Passes.


def test_the_check_names_the_eval_batch_when_evaluation_is_what_does_not_fit(tiny_needs, monkeypatch):
  config, needs = tiny_needs
  small_budget(monkeypatch, (needs.train(64) + 1) * jax.local_device_count())
  config = smoke.get_config()
  config.eval_batch_size = 1000
  assert needs.eval(1000) > needs.train(64)
  with pytest.raises(OutOfMemoryError, match=r'the eval step needs .* --config\.eval_batch_size=1000; fixes: --config'):
    memory.check_steps_fit(config, needs)


def test_training_checks_memory_before_it_writes_the_run(tmp_path, monkeypatch):
  checked = []

  def refuse(config, needs):
    checked.append((needs.length, needs.state.step))
    raise OutOfMemoryError('refused')

  monkeypatch.setattr(memory, 'check_steps_fit', refuse)
  with pytest.raises(OutOfMemoryError, match='refused'):
    trainer.train_and_evaluate(smoke.get_config(), str(tmp_path))
  assert checked == [(1, 0)]  # Stacks of one step (steps_per_call=1), the initial state.
  assert not (tmp_path / 'run.json').exists()  # A rerun with a smaller batch is not refused as another run.


def test_training_runs_the_executables_the_check_compiled(tiny_needs, caplog):
  config, needs = tiny_needs
  setup, state = needs.setup, jax.tree.map(jnp.copy, needs.state)  # The step donates its state.
  needs.train(config.batch_size), needs.eval(config.eval_batch_size)
  pipeline = input_pipeline.create_pipeline(config.data.pipeline, setup.train_split, 64, config.seed, setup.mesh)
  with jax.log_compiles(), caplog.at_level(logging.WARNING):
    state, _ = needs.train_fn(state, next(pipeline.train_batches(0, [1])))
    needs.eval_fn(state, pipeline.eval_batches(setup.eval_split, config.eval_batch_size)[0])
  compiled = [r.getMessage() for r in caplog.records if 'Compiling jit(train_stack' in r.getMessage()]
  compiled += [r.getMessage() for r in caplog.records if 'Compiling jit(eval_step' in r.getMessage()]
  assert not compiled


OUT_OF_MEMORY_COMMAND = """
import jax, jax.numpy as jnp
from absl import app
from ml_collections import config_flags
from resnet_flax import cli
config_flags.DEFINE_config_file('config')
mode = lambda: jax.jit(lambda: jnp.zeros((2**45,), jnp.uint8))().block_until_ready()  # 35 TB: XLA's own failure.
app.run(lambda argv: cli.run(mode, '', None, None, None), flags_parser=cli.parse_flags)
"""


def test_an_out_of_memory_error_that_still_happens_is_one_line():
  command = [sys.executable, '-c', OUT_OF_MEMORY_COMMAND, '--config=configs/smoke.py', '--config.data.image_size=64']
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
    'error: out of memory: XLA could not allocate 35184.4 GB for resnet_tiny with its CIFAR stem on 64x64 images at '
    '--config.batch_size=64 (--config.eval_batch_size=64); fixes: a smaller --config.batch_size or '
    '--config.eval_batch_size, or --config.model.stem=imagenet (16x fewer pixels after it), or a smaller '
    '--config.data.image_size'
  )


def test_other_runtime_errors_are_not_taken_for_out_of_memory():
  assert memory.out_of_memory_message(jax.errors.JaxRuntimeError('INVALID_ARGUMENT: bad shape'), None) is None
  message = memory.out_of_memory_message(jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: while compiling'), None)
  assert message == 'out of memory: XLA ran out of memory; use a smaller batch size or a smaller image size'
