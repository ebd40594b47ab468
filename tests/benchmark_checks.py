"""What a benchmark script's JSON results must hold besides their keys, whatever the machine: every summary
describes its values, each ratio is that of the figures it names, rates and times are positive, an accuracy is a
fraction and a run's times add up. Shared by the tests of the scripts and of benchmarks/gpu_suite.sh."""

import itertools
import math
import statistics
from typing import Any

import pytest

from resnet_flax import models
from resnet_flax.robust import corruption_ops

Results = dict[str, Any]  # A JSON's 'results' (or 'settings').


def summaries_checked(node: Any) -> int:
  """Checks every `benchmarks.common.summarize` figure under `node` (its median, min and max are those of its
  values, finite and not negative); returns how many there were."""
  if isinstance(node, list):
    return sum(summaries_checked(value) for value in node)
  if not isinstance(node, dict):
    return 0
  if set(node) == {'median', 'min', 'max', 'values'}:
    values = node['values']
    assert values and all(math.isfinite(v) and v >= 0 for v in values), node
    assert (node['min'], node['median'], node['max']) == (min(values), statistics.median(values), max(values)), node
    return 1
  return sum(summaries_checked(value) for value in node.values())


def median_ratio(numerator: Results, denominator: Results) -> float:
  return numerator['median'] / denominator['median']


def check_throughput(results: Results, settings: Results):
  assert list(results) == settings['models']
  for model, figures in results.items():
    jax_side, step = figures['jax'], figures['jax']['step_images_per_sec']
    assert jax_side['num_params'] == models.preset_param_count(model) and jax_side['first_step_s'] > 0
    assert step['median'] > 0
    for name in ('pipeline', 'scanned_pipeline'):
      ratio = median_ratio(jax_side[f'{name}_images_per_sec'], step)
      assert figures[f'{name}_over_step'] == pytest.approx(ratio), name
    for key in ('peak_bytes', 'peak_bytes_with_dataset'):  # None where the device does not count them (a CPU).
      assert jax_side[key] is None or jax_side[key] > 0, key
    if figures['torch'] is not None:
      ratio = median_ratio(step, figures['torch']['step_images_per_sec'])
      assert figures['jax_over_torch'] == pytest.approx(ratio)


def check_loop_overhead(results: Results, settings: Results):
  ratio = median_ratio(results['loop_images_per_sec'], results['bare_step_images_per_sec'])
  assert results['loop_over_bare'] == pytest.approx(ratio) and ratio > 0


def check_data_throughput(results: Results, settings: Results):
  augment, step = results['augment_ms']['values'], results['step_ms']['values']
  ratios = [a / s for a, s in zip(augment, step, strict=True)]
  assert results['augment_over_step']['values'] == pytest.approx(ratios)
  assert len(results['tfdata_images_per_sec_one_core']['values']) == settings['repeats']


def check_augment_cost(results: Results, settings: Results):
  baseline = results['crop+flip']['step_seconds']
  assert results['crop+flip']['slowdown_vs_crop_flip'] == 0.0
  for option, figures in results.items():
    slowdown = median_ratio(figures['step_seconds'], baseline) - 1
    assert figures['slowdown_vs_crop_flip'] == pytest.approx(slowdown), option
    assert len(figures['step_seconds']['values']) == settings['repeats'], option


def check_run_times(run: Results):
  """A training run's figures: its time to accuracy is its wall time less its compilation, an accuracy a fraction."""
  assert 0 < run['compile_s'] < run['wall_s'], run
  assert run['train_s'] == pytest.approx(run['wall_s'] - run['compile_s']), run
  assert all(0 <= run[key] <= 1 for key in ('accuracy', 'tta_accuracy') if key in run), run


def check_time_to_accuracy(results: Results, settings: Results):
  runs = results['runs']
  assert len(runs) + len(results['skipped']) == settings['seeds']
  for run in runs:
    check_run_times(run)
  for name, summary in results['summary'].items():
    values = [run[name] for run in runs]
    assert summary['mean'] == pytest.approx(statistics.mean(values)), name
    assert (summary['min'], summary['max']) == (min(values), max(values)), name


def check_compression(results: Results, settings: Results):
  """Besides each artifact's figures: an int8 one under half the bytes of the float32 model (8 bits a weight of
  32, and the format's own), and the more of the weights pruned, the smaller each format's gzipped file."""
  artifacts = results['artifacts']
  floats = {
    (artifact['variant'], artifact['format']): artifact for artifact in artifacts if 'int8' not in artifact['label']
  }
  for artifact in artifacts:
    assert 0 <= artifact['test_accuracy'] <= 1, artifact['label']
    assert 0 < artifact['gzip_bytes'] and 0 < artifact['bytes'], artifact['label']
    latency = {batch: artifact[f'latency_ms_batch_{batch}']['median'] for batch in (1, 64)}
    assert 0 < latency[1] and 0 < latency[64], artifact['label']
    if 'int8' in artifact['label']:
      assert artifact['bytes'] < 0.5 * floats['dense', 'jax']['bytes'], artifact['label']
  for file_format in ('jax', 'tflite', 'onnx'):
    sizes = [floats[variant, file_format]['gzip_bytes'] for variant in ('dense', 'pruned_50', 'pruned_80', 'pruned_90')]
    assert all(larger > smaller for larger, smaller in itertools.pairwise(sizes)), (file_format, sizes)


def check_corruption_speed(results: Results, settings: Results):
  corruptions = results['corruptions']
  assert list(corruptions) == list(corruption_ops.CORRUPTIONS)
  passes = zip(*(figures['seconds']['values'] for figures in corruptions.values()), strict=True)
  totals = [sum(seconds) for seconds in passes]
  assert results['total_seconds']['values'] == pytest.approx(totals)
  first_pass = sum(figures['first_pass_seconds'] for figures in corruptions.values())
  assert results['first_pass_seconds'] == pytest.approx(first_pass) and results['compile_seconds'] <= first_pass
  images = len(corruption_ops.CORRUPTIONS) * len(corruption_ops.SEVERITIES) * settings['examples']
  assert results['images_per_sec']['values'] == pytest.approx([images / total for total in totals])


def check_serve_load(results: Results, settings: Results):
  """Each server got ready and exited 0 after SIGTERM, answered every request, and its peak memory (a high-water
  mark) never fell; each rate and ratio is that of the figures it names."""
  most = str(max(settings['clients']))
  for backend, servers in results['backends'].items():
    assert list(servers) == ['batching', 'no_batching'], backend
    assert servers['no_batching']['max_batch'] == 1 < servers['batching']['max_batch']
    for figures in servers.values():
      assert figures['exit_code'] == 0 and figures['ready_s'] > 0, backend
      levels = figures['clients']
      assert list(levels) == [str(clients) for clients in settings['clients']], backend
      peaks = [figures['peak_rss_bytes_ready'], *(level['peak_rss_bytes'] for level in levels.values())]
      assert peaks[0] > 0 and peaks == sorted(peaks), backend
      for level in levels.values():
        assert level['requests'] > 0 and level['errors'] == 0 == level['error_rate'], backend
        assert level['requests_per_s'] == pytest.approx(level['requests'] / level['seconds'])
        assert 0 < level['latency_ms']['p50'] <= level['latency_ms']['p99'], backend
    ratio = (
      servers['batching']['clients'][most]['requests_per_s'] / servers['no_batching']['clients'][most]['requests_per_s']
    )
    assert results['batching_speedup'][backend] == pytest.approx(ratio)


# script: its check of (results, settings).
CHECKS = {
  'throughput': check_throughput,
  'loop_overhead': check_loop_overhead,
  'data_throughput': check_data_throughput,
  'augment_cost': check_augment_cost,
  'time_to_accuracy': check_time_to_accuracy,
  'compression': check_compression,
  'corruption_speed': check_corruption_speed,
  'serve_load': check_serve_load,
}


def check_record(script: str, record: Results):
  """The checks of `script`'s JSON record: its summaries, then its own."""
  summaries_checked(record['results'])
  CHECKS[script](record['results'], record['settings'])
