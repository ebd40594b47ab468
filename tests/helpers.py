"""Test helpers: running main.py, reading checkpoints. Fixtures live in conftest.py."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from resnet_flax.evaluate import inference
from resnet_flax.models import trained
from resnet_flax.run.workdir import RunInfo

ROOT = Path(__file__).resolve().parents[1]
# Shared by the test runs of main.py, so that only the first one of each program compiles it.
COMPILATION_CACHE = Path(tempfile.gettempdir()) / 'resnet_flax_tests_jax_cache'


def run_main(workdir, *args, devices: int = 1, wait: bool = True, process: tuple[int, int, int] | None = None):
  """Runs main.py with the smoke config; returns (returncode, output), or the Popen if not `wait`.

  `process` = (port, num_processes, process_id) starts one process of a multi-process job.
  """
  command = [
    sys.executable,
    'main.py',
    f'--workdir={workdir}',
    '--config=configs/smoke.py',
    f'--compilation_cache_dir={COMPILATION_CACHE}',
    *args,
  ]
  if process:
    port, count, index = process
    command += [f'--coordinator_address=localhost:{port}', f'--num_processes={count}', f'--process_id={index}']
  return run_command(command, devices, wait)


def run_sweep(*args, wait: bool = True):
  """Runs `python -m resnet_flax.sweep *args`; returns (returncode, output), or the Popen if not `wait`."""
  command = [sys.executable, '-m', 'resnet_flax.sweep', f'--compilation_cache_dir={COMPILATION_CACHE}', *args]
  return run_command(command, devices=1, wait=wait)


def xla_flags(devices: int) -> str:
  """The caller's XLA_FLAGS with `devices` CPU devices: its other flags (`--xla_cpu_max_isa=AVX2` to test another
  vector width) reach the subprocess too."""
  flag = '--xla_force_host_platform_device_count'
  kept = [f for f in os.environ.get('XLA_FLAGS', '').split() if f.split('=')[0] != flag]
  return ' '.join([*kept, f'{flag}={devices}'])


def subprocess_env(devices: int) -> dict[str, str]:
  """The environment of a test's JAX subprocess on `devices` CPU devices."""
  return {
    **os.environ,
    'XLA_FLAGS': xla_flags(devices),
    'JAX_PLATFORMS': 'cpu',
    'TF_CPP_MIN_LOG_LEVEL': '3',
    'PYTHONUNBUFFERED': '1',
  }


def run_command(command: list[str], devices: int, wait: bool):
  env = subprocess_env(devices)
  popen = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  if not wait:
    return popen
  output, _ = popen.communicate(timeout=300)
  return popen.returncode, output


def finished_steps(workdir) -> list[int]:
  """Steps of the complete checkpoints in `workdir`."""
  directory = Path(workdir) / 'checkpoints'
  return sorted(int(p.name) for p in directory.glob('*') if p.name.isdigit()) if directory.exists() else []


def load_checkpoint(workdir, step: int):
  """A checkpoint's arrays on this process's first device, whatever devices saved it."""
  path = Path(workdir) / 'checkpoints' / str(step) / 'default'
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with ocp.StandardCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(path).item_metadata
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
    return checkpointer.restore(path, target)


# The smoke config for 6 epochs of 8 steps: checkpoints every 5 steps, evaluation every epoch.
SMOKE_ARGS = ('--config.num_epochs=6', '--config.log_every_steps=1')
SMOKE_TOTAL_STEPS = 48


def run_smoke(workdir, *args, **kwargs):
  return run_main(workdir, *SMOKE_ARGS, *args, **kwargs)


def checkpoint_layout(workdir, step: int) -> dict[str, list]:
  """{leaf path: [shape, dtype]} of a checkpoint, read from its metadata only."""
  path = Path(workdir) / 'checkpoints' / str(step) / 'default'
  with ocp.StandardCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(path).item_metadata
  leaves = jax.tree_util.tree_flatten_with_path(metadata)[0]
  return {jax.tree_util.keystr(path): [list(m.shape), str(m.dtype)] for path, m in leaves}


def tiny_run_info(**fields) -> RunInfo:
  """The run.json facts of a small two-class run, with `fields` (RunInfo's) replaced."""
  facts = dict(
    model_name='resnet_tiny',
    se_ratio=0.0,
    stem='cifar',
    image_shape=(32, 32, 3),
    class_names=('a', 'b'),
    pixel_mean=(0.5,) * 3,
    pixel_std=(0.2,) * 3,
    steps_per_epoch=8,
  )
  return RunInfo(**{**facts, **fields})


def restore_smoke_run(workdir):
  """(trained.Restored, its test split) of the latest checkpoint of a smoke workdir, in process."""
  from configs import smoke
  from resnet_flax.run import distributed

  restored = trained.restore_workdir(str(workdir), smoke.get_config(), 'latest', distributed.create_mesh())
  return restored, inference.load_test_split(restored.run.config.data, restored.run.info)
