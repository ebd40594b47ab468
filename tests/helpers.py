"""Test helpers: running main.py, reading checkpoints, training a tiny model in process. Fixtures: conftest.py."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import flax
import flax.linen as nn
import httpx
import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from PIL import Image

from configs import default
from resnet_flax import models
from resnet_flax.data import augment
from resnet_flax.evaluate import inference
from resnet_flax.models import trained
from resnet_flax.run import report_paths
from resnet_flax.run.workdir import RunInfo

ROOT = Path(__file__).resolve().parents[1]
# Shared by the test runs of main.py, so that only the first one of each program compiles it.
COMPILATION_CACHE = Path(tempfile.gettempdir()) / 'resnet_flax_tests_jax_cache'


def run_main(
  workdir,
  *args,
  devices: int = 1,
  wait: bool = True,
  process: tuple[int, int, int] | None = None,
  env: dict[str, str] | None = None,
):
  """Runs main.py with the smoke config; returns (returncode, output), or the Popen if not `wait`.

  `process` = (port, num_processes, process_id) starts one process of a multi-process job; `env` adds to the
  subprocess's environment.
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
  return run_command(command, devices, wait, env)


def run_sweep(*args, wait: bool = True):
  """Runs `python -m resnet_flax.sweep *args`; returns (returncode, output), or the Popen if not `wait`."""
  command = [sys.executable, '-m', 'resnet_flax.sweep', f'--compilation_cache_dir={COMPILATION_CACHE}', *args]
  return run_command(command, devices=1, wait=wait)


def free_port() -> int:
  """A TCP port free on 127.0.0.1 now (the OS chooses it)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start_server(workdir, port: int, *args, env: dict[str, str] | None = None) -> subprocess.Popen:
  """`python -m resnet_flax.serve --workdir=<workdir> --port=<port> *args` on 127.0.0.1, output piped."""
  command = [
    sys.executable,
    '-m',
    'resnet_flax.serve',
    f'--workdir={workdir}',
    f'--port={port}',
    f'--compilation_cache_dir={COMPILATION_CACHE}',
    *args,
  ]
  return run_command(command, devices=1, wait=False, env=env)


def wait_until_ready(base_url: str, process: subprocess.Popen | None = None, timeout_s: float = 120) -> float:
  """Seconds until GET <base_url>/readyz answers 200; fails at once if `process` ends first."""
  start = time.perf_counter()
  while time.perf_counter() - start < timeout_s:
    if process is not None and process.poll() is not None:
      raise AssertionError(f'the server exited with {process.returncode}:\n{process.stdout.read()}')
    try:
      if httpx.get(f'{base_url}/readyz', timeout=5).status_code == 200:
        return time.perf_counter() - start
    except httpx.TransportError:  # Not listening yet.
      pass
    time.sleep(0.1)
  raise AssertionError(f'{base_url} was not ready after {timeout_s} s')


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


def run_command(command: list[str], devices: int, wait: bool, env: dict[str, str] | None = None):
  env = {**subprocess_env(devices), **(env or {})}
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


def indexed_report_dir(workdir, data_config, label: str = 'plain') -> Path:
  """The report directory of `workdir`'s one evaluation on that data with that label, as eval/index.json says."""
  index = json.loads((Path(workdir) / 'eval' / report_paths.INDEX_FILE).read_text())['evaluations']
  data = report_paths.report_name(data_config)
  (entry,) = [e for e in index if e['data'] == data and e['label'] == label]
  return Path(workdir) / 'eval' / entry['directory']


# Training in-process.


def numpy_variables(model: nn.Module, image_shape: Sequence[int], seed: int = 0) -> dict:
  """Variables of `model` drawn in numpy (LeCun-normal kernels, BatchNorm as identity): a compiled
  `init` takes seconds on a CPU, these take none."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      return rng.normal(0, 1 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape).astype(leaf.dtype)
    return (np.ones if name in ('scale', 'var') else np.zeros)(leaf.shape, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, dict(models.init_variables(model, image_shape)))


def train_tiny(
  images: np.ndarray, labels: np.ndarray, class_names: Sequence[str], steps: int, batch_size: int = 32
) -> trained.Restored:
  """resnet_tiny trained on `images` (Adam, `steps` batches in order, cycling), as evaluation restores a run."""
  from configs import smoke

  mean, std = augment.channel_stats(images)
  info = tiny_run_info(image_shape=images.shape[1:], class_names=tuple(class_names), pixel_mean=mean, pixel_std=std)
  model = models.create_model('resnet_tiny', len(class_names))
  variables = numpy_variables(model, info.image_shape)
  optimizer = optax.adam(3e-3)

  @jax.jit
  def step(variables, optimizer_state, images, labels):
    def loss(params):
      normalized = augment.normalize(images, mean, std)
      logits, state = model.apply({**variables, 'params': params}, normalized, train=True, mutable=['batch_stats'])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), state

    gradients, state = jax.grad(loss, has_aux=True)(variables['params'])
    updates, optimizer_state = optimizer.update(gradients, optimizer_state, variables['params'])
    return {'params': optax.apply_updates(variables['params'], updates), **state}, optimizer_state

  optimizer_state = optimizer.init(variables['params'])
  for batch in range(steps):
    part = np.arange(batch * batch_size, (batch + 1) * batch_size) % len(images)
    variables, optimizer_state = step(variables, optimizer_state, images[part], labels[part])
  return trained.Restored(trained.TrainedRun(smoke.get_config(), info), model, variables, steps)


def read_class_folders(root, per_class: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """The first `per_class` images of each class folder under `root`, their labels and the class names."""
  names = sorted(path.name for path in root.iterdir())
  images, labels = [], []
  for label, name in enumerate(names):
    for path in sorted((root / name).iterdir())[:per_class]:
      images.append(np.asarray(Image.open(path).convert('RGB')))
      labels.append(label)
  return np.stack(images), np.array(labels, np.int32), names


def overrides_of(add_fields: Callable[[ml_collections.ConfigDict], ml_collections.ConfigDict]) -> list[str]:
  """The `--config.field=value` flags that make a config what `add_fields` (a recipe's, e.g.
  configs/augmix.py's `add_augmix`) makes of it: the fields it changes from configs/default.py."""
  flat = lambda config: flax.traverse_util.flatten_dict(config.to_dict(), sep='.')
  plain, recipe = flat(default.get_config()), flat(add_fields(default.get_config()))
  return [f'--config.{field}={value!r}' for field, value in recipe.items() if plain[field] != value]


def kill_after_first_checkpoint(workdir, *args, timeout_s: float = 300) -> list[int]:
  """Starts the smoke run (`args` its overrides) and SIGKILLs it once it has written a checkpoint; the steps of
  the checkpoints it left."""
  process = run_smoke(workdir, *args, wait=False)
  deadline = time.time() + timeout_s
  while not finished_steps(workdir) and time.time() < deadline:
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert process.returncode == -signal.SIGKILL
  return finished_steps(workdir)
