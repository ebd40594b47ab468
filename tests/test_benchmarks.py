"""The benchmark scripts run: one tiny iteration each on the CPU, writing their JSON results."""

import functools
import json
import operator
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# script: paths into its JSON 'results' that must be there.
EXPECTED_RESULTS = {
  'throughput': [
    ('resnet_tiny', 'jax', 'step_images_per_sec', 'median'),
    ('resnet_tiny', 'jax', 'pipeline_images_per_sec', 'median'),
    ('resnet_tiny', 'jax', 'scanned_pipeline_images_per_sec', 'median'),
    ('resnet_tiny', 'jax', 'peak_bytes'),
    ('resnet_tiny', 'jax', 'peak_bytes_with_dataset'),
    ('resnet_tiny', 'pipeline_over_step'),
    ('resnet_tiny', 'scanned_pipeline_over_step'),
    ('resnet_tiny', 'torch'),  # None where torch is not installed.
  ],
  'loop_overhead': [
    ('bare_step_images_per_sec', 'median'),
    ('loop_images_per_sec', 'median'),
    ('loop_over_bare',),
  ],
  'data_throughput': [
    ('tfdata_images_per_sec_one_core', 'median'),
    ('augment_over_step', 'median'),
  ],
  'augment_cost': [
    ('crop+flip', 'step_seconds', 'median'),
    ('trivialaugment+cutout+mixup/cutmix', 'slowdown_vs_crop_flip'),  # --tiny: only these two.
  ],
  'time_to_accuracy': [
    ('runs', 0, 'train_s'),
    ('summary', 'train_s', 'mean'),
    ('summary', 'compile_s', 'mean'),
    ('summary', 'accuracy', 'mean'),
    ('summary', 'accuracy', 'std'),
  ],
  'compression': [
    ('artifacts', 0, 'test_accuracy'),
    ('artifacts', 0, 'gzip_bytes'),
    ('artifacts', -1, 'latency_ms_batch_64', 'median'),
  ],
  'corruption_speed': [
    ('corruptions', 'fog', 'seconds', 'median'),
    ('corruptions', 'jpeg_compression', 'first_pass_seconds'),
    ('total_seconds', 'median'),
    ('first_pass_seconds',),
    ('compile_seconds',),
  ],
}
# Seconds per script, 300 for the others: compression trains five tiny runs and converts 16 artifacts.
TIMEOUT_S = {'compression': 900}


@pytest.mark.slow
@pytest.mark.parametrize('script', EXPECTED_RESULTS)
def test_benchmark_runs_tiny_and_writes_results(script, tmp_path):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '3'}
  run = subprocess.run(
    [sys.executable, f'benchmarks/{script}.py', '--tiny', f'--output_dir={tmp_path}'],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=TIMEOUT_S.get(script, 300),
  )
  assert run.returncode == 0, run.stdout + run.stderr
  assert 'results: ' in run.stdout
  [path] = tmp_path.glob(f'{script}_cpu_*_tiny.json')
  record = json.loads(path.read_text())
  assert record['benchmark'] == script and record['tiny'] is True
  assert record['device'].startswith('cpu') and record['versions']['jax']
  assert f'benchmarks/{script}.py --tiny' in record['command']
  for keys in EXPECTED_RESULTS[script]:
    functools.reduce(operator.getitem, keys, record['results'])  # Raises if a key is missing.
