"""Compression: the accuracy, size and CPU latency of every way this project makes a model smaller.

From one trained run (`--dense`, e.g. `configs/quick.py`), on CIFAR-10 (JPEG q75), 2 CPU cores:

  python benchmarks/compression.py --dense=runs/quick --teacher=runs/teacher --data_path=<cifar10-jpeg>

It first trains what is missing under `--runs_dir` (default `<dense>-compression/`; a rerun resumes
or skips them), each a normal workdir that `main.py --mode=evaluate` reads too:
- `pruned_50`, `pruned_80`, `pruned_90`: `--finetune_epochs` of fine-tuning from the dense run with
  gradual magnitude pruning to that sparsity (`prune.sparsity`);
- `qat`: the same fine-tuning with quantization-aware training (`quantize.mode=qat`);
- `distilled`: the config's recipe from scratch, distilled from `--teacher` (`distill.teacher`), when
  one is given.
Then every artifact (`artifacts`) is exported (`resnet_flax.deploy.formats`) to `<runs_dir>/artifacts/` and
run by its own runtime, JAX included (the `jax.export` artifact, jitted), measuring:
- test accuracy on the whole test split of the dense run's data;
- size: the artifact's bytes on disk, and gzip-compressed (what pruning saves until a runtime stores
  sparse weights: none of these does);
- latency: one image, and a batch of 64, median (and spread) over `--repeats` calls after a warm-up,
  the inputs already in host memory, the outputs back in host memory (numpy).
It prints a Markdown table, writes the JSON to benchmarks/results/ and plots accuracy against size
to `--plot` (one point per artifact; default `<runs_dir>/compression.png`, outside the repository). `--tiny` runs the whole chain on tiny synthetic data in a
temporary directory: its figures mean nothing.
"""

import dataclasses
import gzip
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The project root instead of this script's folder: there this file would shadow the `compression`
# package that jax imports (`from compression import zstd`).
sys.path[0] = str(Path(__file__).resolve().parents[1])

import matplotlib  # noqa: E402

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from benchmarks import common  # noqa: E402
from resnet_flax import data  # noqa: E402
from resnet_flax.deploy import api, export, formats
from resnet_flax.errors import UserError  # noqa: E402
from resnet_flax.evaluate import inference
from resnet_flax.models import trained
from resnet_flax.train import trainer  # noqa: E402

flags.DEFINE_string('config', 'quick', 'Config module of configs/ the dense run was trained with.')
flags.DEFINE_string('dense', None, 'Workdir of the trained dense run (with --tiny: trained here).')
flags.DEFINE_string('teacher', None, 'Workdir of a stronger run to distil the student from; none: no distilled row.')
flags.DEFINE_string('runs_dir', None, 'Where the derived runs and artifacts go (default <dense>-compression).')
flags.DEFINE_string('data_path', os.environ.get('CIFAR10_JPEG_DIR', ''), 'data.path (default $CIFAR10_JPEG_DIR).')
flags.DEFINE_integer('validation_size', 0, 'data.validation_size, as the dense run was trained with.')
flags.DEFINE_float('finetune_epochs', 1.0, 'Epochs of pruning and QAT fine-tuning from the dense run.')
flags.DEFINE_float(
  'finetune_learning_rate', 0.1, "Peak learning rate of those fine-tunings (no warmup, then the config's schedule)."
)
flags.DEFINE_bool('measure', True, '--nomeasure: train the missing runs only (measure later, on an idle machine).')
flags.DEFINE_integer('repeats', 30, 'Timed calls per latency figure.')
flags.DEFINE_string('plot', None, 'Accuracy against size, one point per artifact (default <runs_dir>/compression.png).')
FLAGS = flags.FLAGS

LATENCY_BATCHES = (1, 64)
RUNTIMES = {'jax': 'JAX', 'tflite': 'LiteRT', 'tflite_int8': 'LiteRT', 'onnx': 'ONNX Runtime'}  # Short names.
SPARSITIES = (0.5, 0.8, 0.9)


@dataclasses.dataclass(frozen=True)
class Artifact:
  variant: str  # The run it comes from: dense, pruned_80, qat, ...
  label: str  # What the row says.
  export_format: str  # A key of formats.FORMATS.
  quantize: str | None = None  # resnet_flax.load(..., quantize=): 'ptq' serves a float run in int8 with qwix.


def artifacts(variants: Sequence[str]) -> list[Artifact]:
  """Each variant in JAX and in the runtimes people deploy it with."""
  rows = [
    Artifact('dense', 'dense float32', 'jax'),
    Artifact('dense', 'dense float32', 'tflite'),
    Artifact('dense', 'dense float32', 'onnx'),
    Artifact('dense', 'int8 PTQ (qwix)', 'jax', quantize='ptq'),
    Artifact('dense', 'int8 PTQ (TFLite)', 'tflite_int8'),
  ]
  if 'qat' in variants:
    rows.append(Artifact('qat', 'int8 QAT (qwix)', 'jax'))
  for variant in variants:
    if variant.startswith('pruned_') or variant == 'distilled':
      label = f'{variant.replace("_", " ")}% sparse' if variant.startswith('pruned_') else 'distilled student'
      rows += [Artifact(variant, label, name) for name in ('jax', 'tflite', 'onnx')]
  return rows


# The derived runs.


def base_config() -> ml_collections.ConfigDict:
  config = common.load_config(FLAGS.config)
  if FLAGS.tiny:
    return common.tiny(config)
  config.data.path = FLAGS.data_path
  config.data.validation_size = FLAGS.validation_size
  return config


def derived_configs(dense: str, teacher: str | None) -> dict[str, ml_collections.ConfigDict]:
  """The config of every run derived from the dense one (and from the teacher)."""

  def fine_tune(**fields) -> ml_collections.ConfigDict:
    config = base_config()
    config.init_from = dense
    config.num_epochs = FLAGS.finetune_epochs
    config.optim.learning_rate = FLAGS.finetune_learning_rate
    config.optim.warmup_epochs = 0.0
    for dotted, value in fields.items():
      section, name = dotted.split('__')
      config[section][name] = value
    return config

  configs = {f'pruned_{round(s * 100)}': fine_tune(prune__sparsity=s) for s in SPARSITIES}
  configs['qat'] = fine_tune(quantize__mode='qat')
  if teacher:
    configs['distilled'] = base_config()
    configs['distilled'].distill.teacher = teacher
  return configs


def train_if_needed(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Trains `workdir` to the end (resuming it), or nothing where it is complete."""
  print(f'training {workdir} (resumes; nothing to do when complete)', flush=True)
  trainer.train_and_evaluate(config, workdir)


# Measuring an artifact.


def gzip_bytes(path: str) -> int | None:
  """Bytes of the file gzip-compressed (level 9); None for a directory."""
  if not os.path.isfile(path):
    return None
  with open(path, 'rb') as f:
    return len(gzip.compress(f.read(), compresslevel=9))


def latency_ms(predict: formats.Predict, images: np.ndarray, batch: int, repeats: int) -> dict[str, Any]:
  """Milliseconds per call on `batch` images, median and spread over `repeats` calls after a warm-up."""
  inputs = np.ascontiguousarray(images[:batch])
  predict(inputs)  # Compiles, allocates, resizes the interpreter's input.
  return common.summarize([1000 * s for s in common.time_calls(lambda: predict(inputs), repeats)])


def accuracy(predict: formats.Predict, split: data.ImageData, targets: np.ndarray, batch_size: int) -> float:
  predictions = [predict(split.images[i : i + batch_size]).argmax(1) for i in range(0, len(split), batch_size)]
  return float(np.mean(np.concatenate(predictions) == targets))


def measure(
  artifact: Artifact, workdir: str, directory: str, split: data.ImageData, calibration: np.ndarray
) -> dict[str, Any]:
  """Exports `artifact` of `workdir` to `directory` and measures it (see the module docstring)."""
  model = api.load(workdir, quantize=artifact.quantize)
  served_as = artifact.quantize or 'float'
  path = os.path.join(directory, f'{artifact.variant}-{served_as}-{formats.FORMATS[artifact.export_format].path}')
  formats.export_artifact(model, artifact.export_format, path, calibration)
  predict = formats.load_artifact(artifact.export_format, path)
  targets = data.class_indices(split.class_names, model.class_names)[split.labels]
  return {
    'variant': artifact.variant,
    'label': artifact.label,
    'format': artifact.export_format,
    'runtime': RUNTIMES[artifact.export_format],
    'workdir': workdir,
    'checkpoint_step': model.step,
    'test_accuracy': accuracy(predict, split, targets, batch_size=256),
    'bytes': formats.artifact_bytes(path),
    'gzip_bytes': gzip_bytes(path),
    **{f'latency_ms_batch_{b}': latency_ms(predict, split.images, b, FLAGS.repeats) for b in LATENCY_BATCHES},
  }


# Output.


def table(rows: Sequence[dict[str, Any]]) -> str:
  lines = [
    '| artifact | runtime | test accuracy | size | gzip | latency, 1 image | latency, batch 64 |',
    '| --- | --- | ---: | ---: | ---: | ---: | ---: |',
  ]
  for row in rows:
    gz = 'n/a' if row['gzip_bytes'] is None else f'{row["gzip_bytes"] / 1024:,.0f} KiB'
    lines.append(
      f'| {row["label"]} | {row["runtime"]} | {100 * row["test_accuracy"]:.2f}% | {row["bytes"] / 1024:,.0f} KiB | '
      f'{gz} | {row["latency_ms_batch_1"]["median"]:.2f} ms | {row["latency_ms_batch_64"]["median"]:.1f} ms |'
    )
  return '\n'.join(lines)


def plot(rows: Sequence[dict[str, Any]], path: str) -> None:
  """Test accuracy against gzip-compressed size: a marker per runtime, each variant named once."""
  figure, axes = plt.subplots(figsize=(8, 5))
  for runtime, marker in zip(dict.fromkeys(RUNTIMES.values()), 'osD', strict=True):
    chosen = [row for row in rows if row['runtime'] == runtime]
    sizes, accuracies = [row['gzip_bytes'] / 1024 for row in chosen], [100 * row['test_accuracy'] for row in chosen]
    axes.scatter(sizes, accuracies, marker=marker, label=runtime, alpha=0.8)
  first_rows = {row['label']: row for row in reversed(rows)}  # The first row of each label.
  for index, (label, row) in enumerate(reversed(first_rows.items())):
    point = (row['gzip_bytes'] / 1024, 100 * row['test_accuracy'])
    offset = (4, 4) if index % 2 == 0 else (4, -11)  # Neighbours' names apart.
    axes.annotate(label, point, fontsize=8, xytext=offset, textcoords='offset points')
  axes.set_xscale('log')
  axes.set(
    xlabel='artifact size, gzip-compressed (KiB, log scale)',
    ylabel='test accuracy (%)',
    title='Test accuracy against artifact size',
  )
  axes.legend(title='runtime')
  axes.grid(alpha=0.3)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def run(dense: str, runs_dir: str, teacher: str | None) -> list[dict[str, Any]]:
  """Trains what is missing, then measures every artifact."""
  workdirs = {'dense': dense}
  for variant, config in derived_configs(dense, teacher).items():
    workdirs[variant] = os.path.join(runs_dir, variant)
    train_if_needed(config, workdirs[variant])
  if not FLAGS.measure:
    return []
  config = base_config()
  info = trained.load_trained_run(dense, config).info
  split = inference.load_test_split(config.data, info)
  calibration = export.calibration_images(
    data.load_splits(inference.resized_as_trained(config.data, info))['train'].images
  )
  directory = os.path.join(runs_dir, 'artifacts')
  os.makedirs(directory, exist_ok=True)
  rows = []
  for artifact in artifacts(list(workdirs)):
    rows.append(measure(artifact, workdirs[artifact.variant], directory, split, calibration))
    print(table(rows[-1:]).splitlines()[-1], flush=True)
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)
  common.apply_tiny({'repeats': 2})
  device = common.jax_device()
  try:
    with tempfile.TemporaryDirectory() as scratch:
      dense = FLAGS.dense
      if FLAGS.tiny:
        dense = os.path.join(scratch, 'dense')
        train_if_needed(base_config(), dense)
      elif not dense:
        raise UserError('--dense=<workdir of a trained run> is required (or --tiny)')
      runs_dir = FLAGS.runs_dir or (os.path.join(scratch, 'runs') if FLAGS.tiny else f'{dense.rstrip("/")}-compression')
      teacher = dense if FLAGS.tiny else FLAGS.teacher
      rows = run(dense, runs_dir, teacher)
      if rows:
        plot_path = FLAGS.plot or os.path.join(runs_dir, 'compression.png')
        plot(rows, plot_path)
  except UserError as e:
    sys.exit(f'error: {e}')
  if not rows:
    return
  print(f'\n{table(rows)}\nplot: {plot_path}')
  settings = {
    'config': f'configs/{FLAGS.config}.py',
    'dense': dense,
    'teacher': teacher,
    'data_path': FLAGS.data_path,
    'validation_size': FLAGS.validation_size,
    'finetune_epochs': FLAGS.finetune_epochs,
    'finetune_learning_rate': FLAGS.finetune_learning_rate,
    'repeats': FLAGS.repeats,
    'latency': 'ms per call, inputs and outputs in host memory, median over repeats after a warm-up',
  }
  common.write_results('compression', device, settings, {'artifacts': rows})


if __name__ == '__main__':
  app.run(main)
