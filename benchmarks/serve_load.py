"""The server under load on loopback: requests/s, latency, errors and memory of `python -m resnet_flax.serve`.

  python benchmarks/serve_load.py --workdir=runs/quick [--backends=jax,onnx,tflite_int8] [--clients=1,8,64]

For each backend and for batching on (`--max_batch`, `--max_wait_ms`) and off (`--max_batch=1 --max_wait_ms=0`), it
starts the server as a subprocess on a free 127.0.0.1 port and records the seconds from the start of the process to
`/readyz` answering 200 (imports, loading, warming every batch size). Then, for each number of concurrent clients, a
bounded asyncio aiohttp client (that many coroutines sharing at most that many keep-alive connections) posts one image per request,
`curl -F file=@...` style, for `--requests` requests or `--seconds`, whichever ends first, after a warm-up of
2 requests per client. It records the median and 99th-percentile latency, requests/s, the error rate (any answer but
200, or none), and the server process's peak resident memory (the kernel's high-water mark, /proc/<pid>/status
VmHWM, so far; psutil's resident size where there is no /proc). The images are `--images` CIFAR-sized JPEGs of
uint8 noise (quality 90, about the bytes of a real photo at the model's size), cycled. The server gets SIGTERM at the
end and must exit 0. The client shares the machine's cores with the server, as it would on one host: the figures
say what one machine serves to itself, with the client's cost included. `--tiny` trains a 4-step model in a
temporary directory, exports it and sends a few requests: its figures mean nothing.
"""

import asyncio
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path[0] = str(Path(__file__).resolve().parents[1])  # Not this folder: see benchmarks/compression.py.

import aiohttp  # noqa: E402
import httpx  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks import common  # noqa: E402
from configs import default  # noqa: E402
from resnet_flax.deploy import export  # noqa: E402
from resnet_flax.deploy.serving import backends  # noqa: E402
from resnet_flax.errors import UserError  # noqa: E402
from resnet_flax.models import trained  # noqa: E402
from resnet_flax.train import trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
flags.DEFINE_string('workdir', None, 'A trained run, exported (--mode=export) for the artifact backends.')
flags.DEFINE_list('backends', ['jax', 'onnx', 'tflite_int8'], 'Backends to serve, one server each.')
flags.DEFINE_list('clients', ['1', '8', '64'], 'Numbers of concurrent clients.')
flags.DEFINE_integer('requests', 2000, 'Requests per number of clients (the most).')
flags.DEFINE_float('seconds', 30.0, 'Seconds per number of clients (the most).')
flags.DEFINE_integer('max_batch', 64, "The server's --max_batch with batching on.")
flags.DEFINE_float('max_wait_ms', 2.0, "The server's --max_wait_ms with batching on.")
flags.DEFINE_integer('images', 64, 'Distinct images sent, cycled.')
flags.DEFINE_float('ready_timeout', 300.0, 'Seconds a server may take to get ready.')
FLAGS = flags.FLAGS

BATCHING = {'batching': None, 'no_batching': (1, 0.0)}  # Server settings: (max_batch, max_wait_ms); None: the flags.
WARMUP_PER_CLIENT = 2


# The server.


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def peak_rss_bytes(pid: int) -> int:
  """The process's peak resident memory so far (VmHWM); its current resident memory where there is no /proc."""
  status = Path(f'/proc/{pid}/status')
  if status.exists():
    for line in status.read_text().splitlines():
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) * 1024
  import psutil  # Only where there is no /proc: not a dependency of the project.

  return psutil.Process(pid).memory_info().rss


class Server:
  """`python -m resnet_flax.serve` of `workdir` on a free port, its output in `log`; stopped with SIGTERM."""

  def __init__(self, workdir: str, backend: str, max_batch: int, max_wait_ms: float, log: Path):
    self.port = free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self.log = log
    command = [
      sys.executable,
      '-m',
      'resnet_flax.serve',
      f'--workdir={workdir}',
      f'--port={self.port}',
      f'--backend={backend}',
      f'--max_batch={max_batch}',
      f'--max_wait_ms={max_wait_ms}',
      '--noaccess_log',
    ]
    self.start = time.perf_counter()
    with open(log, 'w') as output:
      self.process = subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)

  def wait_until_ready(self) -> float:
    """Seconds from the start of the process to /readyz answering 200."""
    while time.perf_counter() - self.start < FLAGS.ready_timeout:
      if self.process.poll() is not None:
        raise UserError(f'the server exited with {self.process.returncode}: {self.log.read_text()[-2000:]}')
      try:
        if httpx.get(f'{self.url}/readyz', timeout=5).status_code == 200:
          return time.perf_counter() - self.start
      except httpx.TransportError:
        pass
      time.sleep(0.05)
    raise UserError(f'the server was not ready after {FLAGS.ready_timeout:.0f} s: {self.log.read_text()[-2000:]}')

  def stop(self) -> int:
    """SIGTERM, then its exit code (0: it drained and stopped)."""
    if self.process.poll() is None:
      self.process.send_signal(signal.SIGTERM)
    try:
      return self.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
      self.process.kill()
      return self.process.wait()


# The client.


def noise_jpegs(count: int, size: tuple[int, ...]) -> list[bytes]:
  images = common.random_split(count, image_shape=(*size, 3)).images
  encoded = []
  for image in images:
    output = io.BytesIO()
    Image.fromarray(image).save(output, format='JPEG', quality=90)
    encoded.append(output.getvalue())
  return encoded


async def load(url: str, images: list[bytes], clients: int, requests: int, seconds: float) -> dict[str, Any]:
  """`clients` coroutines posting one image each per request until `requests` are sent or `seconds` are up.

  The client is aiohttp's, not httpx's: on these 2 cores, shared with the server, an httpx client of 64
  connections sent 99 requests/s where aiohttp's sent 672 to the same server (ONNX Runtime, batching on), so
  with httpx the figures measured the client."""
  latencies, failures, sent = [], 0, 0
  connector = aiohttp.TCPConnector(limit=clients)
  async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

    async def post(index: int) -> bool:
      form = aiohttp.FormData()
      form.add_field('file', images[index % len(images)], filename=f'{index}.jpg', content_type='image/jpeg')
      try:
        async with session.post('/v1/predict', data=form) as response:
          await response.read()
          return response.status == 200
      except (aiohttp.ClientError, TimeoutError):
        return False

    await asyncio.gather(*(post(i) for i in range(WARMUP_PER_CLIENT * clients)))
    start = time.perf_counter()

    async def worker() -> None:
      nonlocal sent, failures
      while sent < requests and time.perf_counter() - start < seconds:
        sent += 1
        began = time.perf_counter()
        ok = await post(sent)
        latencies.append(time.perf_counter() - began)
        failures += not ok

    await asyncio.gather(*(worker() for _ in range(clients)))
    elapsed = time.perf_counter() - start
  milliseconds = np.array(latencies) * 1000
  return {
    'requests': len(latencies),
    'seconds': elapsed,
    'requests_per_s': len(latencies) / elapsed,
    'errors': failures,
    'error_rate': failures / len(latencies),
    'latency_ms': {
      'p50': float(np.percentile(milliseconds, 50)),
      'p99': float(np.percentile(milliseconds, 99)),
      'mean': float(statistics.fmean(milliseconds)),
    },
  }


# Measuring.


def measure_server(workdir: str, backend: str, batching: str, images: list[bytes], logs: Path) -> dict[str, Any]:
  """Start-up time, then each number of clients' figures and the peak memory so far, of one server."""
  max_batch, max_wait_ms = BATCHING[batching] or (FLAGS.max_batch, FLAGS.max_wait_ms)
  server = Server(workdir, backend, max_batch, max_wait_ms, logs / f'{backend}_{batching}.log')
  try:
    figures = {'max_batch': max_batch, 'max_wait_ms': max_wait_ms, 'ready_s': server.wait_until_ready()}
    figures['peak_rss_bytes_ready'] = peak_rss_bytes(server.process.pid)
    figures['clients'] = {}
    for clients in map(int, FLAGS.clients):
      level = asyncio.run(load(server.url, images, clients, FLAGS.requests, FLAGS.seconds))
      level['peak_rss_bytes'] = peak_rss_bytes(server.process.pid)
      figures['clients'][str(clients)] = level
      print(row(backend, batching, clients, level, figures['ready_s']), flush=True)
  finally:
    exit_code = server.stop()
  return {**figures, 'exit_code': exit_code}


def row(backend: str, batching: str, clients: int, level: dict[str, Any], ready_s: float) -> str:
  latency = level['latency_ms']
  return (
    f'| {backend} | {batching.replace("_", " ")} | {clients} | {latency["p50"]:.2f} | {latency["p99"]:.2f} | '
    f'{level["requests_per_s"]:,.0f} | {100 * level["error_rate"]:.1f}% | {level["peak_rss_bytes"] / 2**20:,.0f} | '
    f'{ready_s:.1f} |'
  )


HEADER = (
  '| backend | batching | clients | p50 latency (ms) | p99 latency (ms) | requests/s | errors | peak RSS (MiB) | '
  'ready (s) |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |'
)


def speedups(results: dict[str, Any]) -> dict[str, float]:
  """Per backend: requests/s with batching over without, at the most clients."""
  most = str(max(map(int, FLAGS.clients)))
  return {
    backend: figures['batching']['clients'][most]['requests_per_s']
    / figures['no_batching']['clients'][most]['requests_per_s']
    for backend, figures in results.items()
  }


def tiny_workdir(scratch: str) -> str:
  """A 4-step resnet_tiny run on synthetic data, exported for the artifact backends asked for."""
  config = common.tiny(common.load_config('smoke'))
  workdir = os.path.join(scratch, 'tiny')
  trainer.train_and_evaluate(config, workdir)
  artifacts = [name for name in FLAGS.backends if name in backends.RUNTIMES]
  if artifacts:
    export.run_export(config, workdir, artifacts, test_images=0)
  return workdir


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)
  common.apply_tiny({'clients': ['1', '4'], 'requests': 16, 'seconds': 10.0, 'images': 4, 'max_batch': 4})
  device = common.jax_device()
  results = {}
  try:
    with tempfile.TemporaryDirectory() as scratch:
      workdir = tiny_workdir(scratch) if FLAGS.tiny else FLAGS.workdir
      if not workdir:
        raise UserError('--workdir=<a trained run, exported> is required (or --tiny)')
      info = trained.load_trained_run(workdir, default.get_config()).info
      images = noise_jpegs(FLAGS.images, info.image_shape[:2])
      print(f'device: {device}; {info.model_name} at {info.image_shape[0]}x{info.image_shape[1]} from {workdir}')
      print(HEADER)
      for backend in FLAGS.backends:
        results[backend] = {b: measure_server(workdir, backend, b, images, Path(scratch)) for b in BATCHING}
  except UserError as e:
    sys.exit(f'error: {e}')
  ratios = speedups(results)
  print(
    'requests/s with batching over without, at the most clients: '
    + ', '.join(f'{b} {r:.2f}x' for b, r in ratios.items())
  )
  settings = {
    'workdir': workdir,
    'model': info.model_name,
    'image_size': list(info.image_shape[:2]),
    'clients': list(map(int, FLAGS.clients)),
    'requests': FLAGS.requests,
    'seconds': FLAGS.seconds,
    'images': f'{FLAGS.images} JPEGs (quality 90) of uint8 noise at the model size, one per request',
    'cpu_count': os.cpu_count(),
  }
  common.write_results('serve_load', device, settings, {'backends': results, 'batching_speedup': ratios})


if __name__ == '__main__':
  app.run(main)
