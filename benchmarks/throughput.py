"""Train-step throughput of JAX vs a PyTorch reference, the device pipeline's cost, and peak GPU memory.

On one GPU (the GPU machine: carry [".carry"], see ../shared/device/pack-carry):

  source .carry/setup.sh && python benchmarks/throughput.py

For each preset (`--models`, default resnet18 and resnet34), at `--batch_size` 512 in bfloat16:
1. JAX step: images/s of the train step that `trainer.train_and_evaluate` builds (configs/default.py
   with `half_precision=True`: jit over the ('data',) mesh, state donated, crop + flip in the step)
   on one batch already on the device.
2. JAX device pipeline + step: images/s of whole epochs of the loop as training runs it with
   `data.pipeline=device`: each call's batches gathered in jit from a `--dataset_size` uint8 dataset
   resident on the device (new permutation each epoch), then the same step; once with one step per
   call, once with `--steps_per_call` steps per call (`lax.scan`, config `steps_per_call`).
3. PyTorch step: images/s of benchmarks/torch_resnet.py's twin of the model and step (same blocks,
   widths, BatchNorm, SGD-Nesterov with weight decay, the config's label smoothing, crop + flip on
   the device, bf16 autocast, channels_last, torch.compile, cudnn.benchmark) on one batch on the
   device. Skipped, saying so, where torch is not importable.
4. Peak memory: `peak_bytes_in_use` of JAX's allocator after 1 (without the dataset) and after 2,
   `torch.cuda.max_memory_allocated()` after 3; 'n/a' on a CPU. Both are peaks over the worker's
   life, so the scratch memory of autotuning (XLA's, cudnn.benchmark's) counts too.

Every figure is the median over `--repeats` timings of `--steps` steps (of an epoch for 2), with min
and max, after `--warmup_steps` untimed steps (an untimed epoch for 2; the first step, compilation
included, is timed on its own). Timings
use time.perf_counter around the steps and end with jax.block_until_ready / torch.cuda.synchronize.
Each (framework, preset) runs in a process of its own: JAX's allocator has no reset of its peak,
JAX preallocates most of the GPU's memory, and the two frameworks' CUDA libraries stay apart.
Data are uint8 noise of CIFAR's shape: a step costs the same on any pixels. With `--deadline`, a
worker that would end past it (by the longest worker so far) is skipped, and the JSON says so.
"""

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # Not this folder: see benchmarks/compression.py.

import ml_collections  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from benchmarks import common  # noqa: E402
from configs import default  # noqa: E402
from resnet_flax import models  # noqa: E402
from resnet_flax.data import augment

# XLA:CPU's YNNPACK fusions of dots, elementwise ops, reductions and convolutions (jaxlib 0.10).
YNN_FLAG = '--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce,individual_convolution'
flags.DEFINE_list('models', ['resnet18', 'resnet34'], 'Presets to measure (resnet18, resnet34, resnet_tiny).')
flags.DEFINE_integer('batch_size', 512, 'Global batch size.')
flags.DEFINE_integer('steps', 50, 'Train steps per timing.')
flags.DEFINE_integer('warmup_steps', 10, 'Untimed steps after the first, before the timings.')
flags.DEFINE_integer('repeats', 5, 'Timings of each kind.')
flags.DEFINE_integer('dataset_size', 50_000, 'Images of the device-resident dataset of the pipeline timing.')
flags.DEFINE_integer('steps_per_call', 16, 'Steps per compiled call of the scanned device-pipeline timing.')
flags.DEFINE_bool('torch_compile', True, 'Compile the PyTorch step with torch.compile.')
flags.DEFINE_bool('half_precision', True, 'bfloat16 compute; --nohalf_precision: float32 (what CPUs run best).')
flags.DEFINE_bool('xla_cpu_ynn', False, f'CPU: the JAX workers run with XLA_FLAGS={YNN_FLAG} added.')
flags.DEFINE_enum('worker', None, ['jax', 'torch'], 'Internal: measure one framework on --worker_model.')
flags.DEFINE_string('worker_model', None, 'Internal: the preset a worker measures.')
flags.DEFINE_string('worker_output', None, 'Internal: where a worker writes its figures.')
FLAGS = flags.FLAGS

TINY = {
  'models': ['resnet_tiny'],
  'batch_size': 8,
  'steps': 1,
  'warmup_steps': 0,
  'repeats': 2,
  'dataset_size': 32,
  'steps_per_call': 3,
  'torch_compile': False,
}  # torch.compile alone takes ~45 s on a CPU.


def make_config(model_name: str) -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model.name = model_name
  config.half_precision = FLAGS.half_precision
  config.batch_size = FLAGS.batch_size
  config.data.pipeline = 'device'  # What timing 2 runs; the GPU machines have no TensorFlow for tf.data.
  return config


def rates(seconds: list[float]) -> list[float]:
  return [FLAGS.steps * FLAGS.batch_size / s for s in seconds]


def jax_figures(model_name: str) -> dict:
  config = make_config(model_name)
  split = common.random_split(FLAGS.dataset_size)
  jax_trainer = common.create_jax_trainer(config, split)
  batch = jax_trainer.device_batch(split)
  (first_step_s,) = common.time_calls(lambda: jax_trainer.run_on(batch, 1), repeats=1)
  jax_trainer.run_on(batch, FLAGS.warmup_steps)
  step_seconds = common.time_calls(lambda: jax_trainer.run_on(batch, FLAGS.steps), FLAGS.repeats)
  peak_bytes = common.jax_peak_bytes()

  pipeline = jax_trainer.pipeline(split)
  epoch_images = pipeline.steps_per_epoch * config.batch_size

  def epoch_rates(steps_per_call: int) -> list[float]:
    jax_trainer.run_epoch(
      pipeline, steps_per_call
    )  # Compiles the permutation, the gather and the calls of each length.
    timings = common.time_calls(lambda: jax_trainer.run_epoch(pipeline, steps_per_call), FLAGS.repeats)
    return [epoch_images / s for s in timings]

  jax_trainer.run_epoch(pipeline, 1)  # To the start of an epoch.
  pipeline_rates, scanned_rates = epoch_rates(1), epoch_rates(FLAGS.steps_per_call)
  return {
    'device': common.jax_device(),
    'num_params': models.count_params(jax_trainer.state.params),
    'first_step_s': first_step_s,
    'step_images_per_sec': common.summarize(rates(step_seconds)),
    'pipeline_images_per_sec': common.summarize(pipeline_rates),
    'scanned_pipeline_images_per_sec': common.summarize(scanned_rates),
    'peak_bytes': peak_bytes,
    'peak_bytes_with_dataset': common.jax_peak_bytes(),
  }


def torch_figures(model_name: str) -> dict:
  import torch  # Optional: only this worker needs it.

  from benchmarks import torch_resnet

  config = make_config(model_name)
  assert tuple(config.augment.train_ops) == ('crop', 'flip') and config.augment.pad_mode == 'reflect', (
    'torch_resnet mirrors crop (reflect) + flip only'
  )
  assert config.optim.name == 'sgd' and not config.optim.bn_scale_frozen and not config.ema_decay, (
    'torch_resnet mirrors plain SGD only'
  )
  cuda = torch.cuda.is_available()
  device = torch.device('cuda' if cuda else 'cpu')
  torch.backends.cudnn.benchmark = True  # Times cuDNN's algorithms and keeps the fastest, as XLA autotunes.
  split = common.random_split(FLAGS.batch_size)
  mean, std = augment.channel_stats(split.images)
  model = torch_resnet.prepare(torch_resnet.create_model(model_name, len(split.class_names)), device)
  optim = config.optim
  optimizer = torch_resnet.create_optimizer(
    model, optim.learning_rate, optim.momentum, optim.nesterov, optim.weight_decay
  )
  step = torch_resnet.make_train_step(
    model,
    optimizer,
    label_smoothing=optim.label_smoothing,
    pixel_mean=mean,
    pixel_std=std,
    crop_padding=config.augment.crop_padding,
    compile_model=FLAGS.torch_compile,
  )
  images = torch.from_numpy(split.images).to(device)
  labels = torch.from_numpy(split.labels).long().to(device)

  def run(num_steps: int):
    for _ in range(num_steps):
      step(images, labels)
    if cuda:
      torch.cuda.synchronize()

  (first_step_s,) = common.time_calls(lambda: run(1), repeats=1)
  run(FLAGS.warmup_steps)
  step_seconds = common.time_calls(lambda: run(FLAGS.steps), FLAGS.repeats)
  return {
    'device': torch.cuda.get_device_name() if cuda else 'cpu',
    'num_params': torch_resnet.count_params(model),
    'compiled': FLAGS.torch_compile,
    'first_step_s': first_step_s,
    'step_images_per_sec': common.summarize(rates(step_seconds)),
    'peak_bytes': torch.cuda.max_memory_allocated() if cuda else None,
  }


def run_worker(framework: str, model_name: str) -> dict:
  """Measures one framework on one preset in a fresh process (this script, with the same flags)."""
  with tempfile.TemporaryDirectory() as directory:
    output = Path(directory) / 'figures.json'
    command = [
      sys.executable,
      __file__,
      *sys.argv[1:],
      f'--worker={framework}',
      f'--worker_model={model_name}',
      f'--worker_output={output}',
    ]
    env = dict(os.environ)
    if framework == 'jax' and FLAGS.xla_cpu_ynn:
      env['XLA_FLAGS'] = f'{env.get("XLA_FLAGS", "")} {YNN_FLAG}'.strip()
    returncode = subprocess.run(command, env=env).returncode
    if returncode:
      return {'error': f'the {framework} worker for {model_name} exited with code {returncode}; see its output above'}
    return json.loads(output.read_text())


class Workers:
  """Runs the workers one after another, each only where it fits before --deadline: its estimate is the
  longest worker so far (none for the first, which runs unless the deadline has passed)."""

  def __init__(self):
    self.longest_s = 0.0

  def run(self, framework: str, model_name: str) -> dict:
    skipped = common.over_budget(f'{framework} on {model_name}', self.longest_s)
    if skipped:
      print(skipped, flush=True)
      return {'skipped': skipped}
    start = time.perf_counter()
    figures = run_worker(framework, model_name)
    self.longest_s = max(self.longest_s, time.perf_counter() - start)
    return figures


def measure(model_name: str, workers: Workers, torch_available: bool) -> dict:
  figures = {
    'jax': workers.run('jax', model_name),
    'torch': workers.run('torch', model_name) if torch_available else None,
  }
  jax_rate = figures['jax'].get('step_images_per_sec', {}).get('median')
  if jax_rate:
    figures['pipeline_over_step'] = figures['jax']['pipeline_images_per_sec']['median'] / jax_rate
    figures['scanned_pipeline_over_step'] = figures['jax']['scanned_pipeline_images_per_sec']['median'] / jax_rate
  torch_rate = (figures['torch'] or {}).get('step_images_per_sec', {}).get('median')
  if jax_rate and torch_rate:
    figures['jax_over_torch'] = jax_rate / torch_rate
  return figures


def print_figures(model_name: str, figures: dict):
  jax_side, torch_side = figures['jax'], figures['torch']
  precision = 'bfloat16' if FLAGS.half_precision else 'float32'
  print(f'\n{model_name}, batch {FLAGS.batch_size}, {precision}{", XLA:CPU YNN fusions" if FLAGS.xla_cpu_ynn else ""}')
  if 'error' in jax_side:
    print(f'  JAX: FAILED: {jax_side["error"]}')
  elif 'skipped' in jax_side:
    print(f'  JAX: {jax_side["skipped"]}')
  else:
    print(f'  JAX ({jax_side["num_params"]:,} parameters, first step {jax_side["first_step_s"]:.1f} s)')
    print(f'    step, batch on device:     {common.images_per_sec(jax_side["step_images_per_sec"]["values"])}')
    print(f'    device pipeline + step:    {common.images_per_sec(jax_side["pipeline_images_per_sec"]["values"])}')
    print(f'    pipeline + step / step:    {figures["pipeline_over_step"]:.1%}')
    print(
      f'    the same, {FLAGS.steps_per_call} steps a call: '
      f'{common.images_per_sec(jax_side["scanned_pipeline_images_per_sec"]["values"])}'
    )
    print(f'    scanned pipeline / step:   {figures["scanned_pipeline_over_step"]:.1%}')
    print(
      f'    peak memory: {common.gibibytes(jax_side["peak_bytes"])} '
      f'({common.gibibytes(jax_side["peak_bytes_with_dataset"])} with the dataset on the device)'
    )
  if torch_side is None:
    print('  PyTorch: skipped, torch is not importable here')
  elif 'error' in torch_side:
    print(f'  PyTorch: FAILED: {torch_side["error"]}')
  elif 'skipped' in torch_side:
    print(f'  PyTorch: {torch_side["skipped"]}')
  else:
    compiled = 'torch.compile' if torch_side['compiled'] else 'eager'
    print(
      f'  PyTorch ({torch_side["num_params"]:,} parameters, {compiled}, first step {torch_side["first_step_s"]:.1f} s)'
    )
    print(f'    step, batch on device:     {common.images_per_sec(torch_side["step_images_per_sec"]["values"])}')
    print(f'    peak memory: {common.gibibytes(torch_side["peak_bytes"])}')
  if 'jax_over_torch' in figures:
    print(f'  JAX / PyTorch images/s: {figures["jax_over_torch"]:.2f}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)
  common.apply_tiny(TINY)
  if FLAGS.worker:
    measure_one = jax_figures if FLAGS.worker == 'jax' else torch_figures
    Path(FLAGS.worker_output).write_text(json.dumps(measure_one(FLAGS.worker_model)))
    return
  # This process only starts the workers: it never touches a device, so the GPU is all theirs.
  torch_available = importlib.util.find_spec('torch') is not None
  if not torch_available:
    print('torch is not importable here: measuring JAX only.')
  settings = {
    'config': 'configs/default.py',
    'half_precision': FLAGS.half_precision,
    'xla_flags_added': YNN_FLAG if FLAGS.xla_cpu_ynn else '',
    'models': FLAGS.models,
    'batch_size': FLAGS.batch_size,
    'steps': FLAGS.steps,
    'warmup_steps': FLAGS.warmup_steps,
    'repeats': FLAGS.repeats,
    'dataset_size': FLAGS.dataset_size,
    'steps_per_call': FLAGS.steps_per_call,
    'torch_compile': FLAGS.torch_compile,
  }
  variant = f'{"" if FLAGS.half_precision else "f32"} {"ynn" if FLAGS.xla_cpu_ynn else ""}'
  workers, results = Workers(), {}
  for name in FLAGS.models:  # Written after each preset: a run stopped from outside keeps what it measured.
    results[name] = measure(name, workers, torch_available)
    device = next((r['jax']['device'] for r in results.values() if 'device' in r['jax']), 'unknown device')
    common.write_results('throughput', device, settings, results, variant)
  print(f'\ndevice: {device}; {FLAGS.steps} steps x {FLAGS.repeats} repeats after {FLAGS.warmup_steps} warm-up steps')
  for name, figures in results.items():
    print_figures(name, figures)
  failed = [
    f'{name} {framework}'
    for name, figures in results.items()
    for framework in ('jax', 'torch')
    if figures[framework] and 'error' in figures[framework]
  ]
  if failed:
    sys.exit(f'failed: {", ".join(failed)}')


if __name__ == '__main__':
  app.run(main)
