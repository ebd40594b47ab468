"""The benchmark scripts run: one tiny iteration each on the CPU, writing JSON results that hold together
(`benchmark_checks`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmark_checks import CHECKS, check_record

ROOT = Path(__file__).resolve().parents[1]

# Seconds per script, 300 for the others: compression trains five tiny runs and converts 16 artifacts.
TIMEOUT_S = {'compression': 900}


@pytest.mark.slow
@pytest.mark.parametrize('script', CHECKS)
def test_benchmark_runs_tiny_and_writes_consistent_results(script, tmp_path):
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
  check_record(script, record)
