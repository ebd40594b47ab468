"""benchmarks/gpu_suite.sh --tiny on the CPU, without what the GPU machine lacks, so that the one GPU
run a task may be lent cannot fail on a typo; and the deadline that keeps each part within its share."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmark_checks import check_record, check_run_times

ROOT = Path(__file__).resolve().parents[1]
# What our code may import that the GPU image lacks and ../shared/device/pack-carry does not bring
# (it brings ml_collections, clu and, named on its command line, qwix): importing any fails the test.
GPU_IMAGE_LACKS = ('tensorflow', 'tensorflow_datasets', 'dm_pix', 'optuna', 'sqlalchemy', 'psycopg', 'tf2onnx')
NUM_CLASSES = 10
# The suite's parts: the benchmark script each runs (its JSON's checks).
PART_SCRIPTS = {
  'tune': 'time_to_accuracy',
  'fast': 'time_to_accuracy',
  'fast_muon': 'time_to_accuracy',
  'throughput': 'throughput',
  'resnet18': 'time_to_accuracy',
}


def jpeg_folder(root: Path) -> Path:
  """CIFAR-10's layout in miniature: train/ and test/ class folders of 32x32 JPEGs (q75)."""
  rng = np.random.default_rng(0)
  for split, per_class in (('train', 8), ('test', 2)):
    for label in range(NUM_CLASSES):
      folder = root / split / f'class_{label}'
      folder.mkdir(parents=True)
      for i in range(per_class):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f'{i}.jpg', quality=75)
  return root


def gpu_like_env(tmp_path: Path, **extra: str) -> dict[str, str]:
  """This environment, with GPU_IMAGE_LACKS unimportable in every Python process (a sitecustomize)."""
  site = tmp_path / 'gpu_image'
  site.mkdir()
  (site / 'sitecustomize.py').write_text(
    f'import sys\nfor name in {GPU_IMAGE_LACKS!r}:\n  sys.modules[name] = None  # Its import now fails.\n'
  )
  return {**os.environ, 'PYTHONPATH': str(site), 'JAX_PLATFORMS': 'cpu', 'PYTHON': sys.executable, **extra}


def results(path: str) -> dict:
  return json.loads(Path(path).read_text())['results']


def check_tuning_choice(tuning: dict):
  """The rate of the best validation accuracy among the trials of the first steps per call, then the steps per call
  of the least training time at that rate, each trial's figures adding up."""
  trials, chosen = tuning['trials'], tuning['chosen']
  for trial in trials:
    check_run_times(trial)
  of_rates = [trial for trial in trials if trial['steps_per_call'] == trials[0]['steps_per_call']]
  assert chosen['learning_rate'] == max(of_rates, key=lambda trial: trial['accuracy'])['learning_rate']
  at_rate = [trial for trial in trials if trial['learning_rate'] == chosen['learning_rate']]
  assert chosen['steps_per_call'] == min(at_rate, key=lambda trial: trial['train_s'])['steps_per_call']


@pytest.mark.slow  # Two minutes: every part of the suite, each a process.
def test_gpu_suite_tiny_runs_every_part_without_what_the_gpu_image_lacks(tmp_path):
  data = jpeg_folder(tmp_path / 'cifar10-jpeg')
  output_dir = tmp_path / 'results'
  run = subprocess.run(
    ['bash', 'benchmarks/gpu_suite.sh', '--tiny', f'--output_dir={output_dir}', '--budget_s=800'],
    cwd=ROOT,
    env=gpu_like_env(tmp_path, CIFAR10_JPEG_DIR=str(data)),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-5000:]
  [summary_path] = output_dir.glob('gpu_suite_cpu_*_tiny.json')
  summary = results(summary_path)
  parts = summary['parts']
  assert list(parts) == ['tune', 'fast', 'fast_muon', 'throughput', 'resnet18']
  assert all(part['status'] == 0 and part['json'] and not part['skipped'] for part in parts.values()), parts
  assert summary['within_budget'] and summary['wall_s'] <= 800
  assert sum(part['seconds'] for part in parts.values()) <= summary['wall_s'] + len(parts)  # One after another.
  for name, part in parts.items():
    check_record(PART_SCRIPTS[name], json.loads(Path(part['json']).read_text()))

  tuning = results(parts['tune']['json'])['tuning']
  check_tuning_choice(tuning)
  assert tuning['chosen']['learning_rate'] in (0.5, 0.8, 1.2) and tuning['chosen']['steps_per_call'] in (1, 8)
  assert len(tuning['trials']) == 4 and all(trial['seed'] == 1000 for trial in tuning['trials'])
  fast_record = json.loads(Path(parts['fast']['json']).read_text())
  assert fast_record['settings']['data_path'] == str(data)
  chosen_in_fast = fast_record['settings']['config_values']
  assert chosen_in_fast['optim']['learning_rate'] == tuning['chosen']['learning_rate']
  assert chosen_in_fast['steps_per_call'] == tuning['chosen']['steps_per_call']
  [seed] = fast_record['results']['runs']
  assert 0 <= seed['tta_accuracy'] <= 1 and seed['train_s'] > 0
  muon_record = json.loads(Path(parts['fast_muon']['json']).read_text())
  assert (
    muon_record['settings']['config_values']['optim']['name'] == 'muon'
    and parts['fast_muon']['json'] != parts['fast']['json']
  )

  assert results(parts['throughput']['json'])['resnet_tiny']['jax']['step_images_per_sec']['median'] > 0
  resnet18 = results(parts['resnet18']['json'])
  assert resnet18['fit']['num_epochs'] >= 1 and len(resnet18['runs']) == 1

  targets = {target['target']: target for target in summary['targets']}
  assert len(targets) == 5  # fast with SGD and with Muon; resnet_tiny's JAX/PyTorch ratio and pipeline; resnet18.
  if importlib.util.find_spec('torch') is None:  # As in CI; on the GPU machine the ratio is measured.
    ratio = next(target for name, target in targets.items() if 'PyTorch' in name)
    assert ratio['met'] is None and 'torch: not importable' in ratio['measured']
  assert 'gpu_suite on cpu' in run.stdout and 'configs/fast.py: mean test accuracy' in run.stdout


@pytest.mark.parametrize(
  'args, skipped',
  [
    (['--seeds=1', '--run_estimate_s=600'], ['seed 0 skipped: estimated 600 s']),
    (['--seeds=1', '--fit_epochs', '--run_estimate_s=600'], ['the fit of the epochs skipped: estimated 600 s']),
  ],
)
def test_a_run_that_would_end_past_the_deadline_is_skipped_and_the_json_says_so(tmp_path, args, skipped):
  run = subprocess.run(
    [
      sys.executable,
      'benchmarks/time_to_accuracy.py',
      '--tiny',
      f'--output_dir={tmp_path}',
      f'--deadline={time.time() + 120}',  # Time left, but less than the estimate.
      *args,
    ],
    cwd=ROOT,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'CIFAR10_JPEG_DIR': ''},
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert run.returncode == 0, run.stdout + run.stderr
  [path] = tmp_path.glob('time_to_accuracy_cpu_*_tiny.json')
  record = results(path)
  assert record['runs'] == [] and record['summary'] == {}
  assert [reason[: len(prefix)] for reason, prefix in zip(record['skipped'], skipped, strict=True)] == skipped
