"""The summary of benchmarks/gpu_suite.sh: each part's figures against the targets, in one JSON.

  python benchmarks/gpu_suite_summary.py --parts=<parts.tsv> --budget_s=540 --wall_s=<suite seconds>

`--parts` is the suite's record, a line per part: name, exit status, seconds, and the JSON it wrote
(empty where it wrote none). Reads those JSONs; prints each target with its measured figure (or why
there is none) and writes `gpu_suite_<device>.json`: the parts, the targets, the suite's wall time.
Exits non-zero where a part failed; a missed target is a finding, not a failure.
"""

import csv
import json
import sys
from pathlib import Path
from typing import Any

sys.path[0] = str(Path(__file__).resolve().parents[1])  # Not this folder: see benchmarks/compression.py.

from absl import app, flags  # noqa: E402

from benchmarks import common  # noqa: E402

flags.DEFINE_string('parts', None, "The suite's record of its parts (tab-separated).", required=True)
flags.DEFINE_float('budget_s', 540, "The suite's budget of wall time, seconds.")
flags.DEFINE_float('wall_s', None, "The suite's wall time, seconds.", required=True)
FLAGS = flags.FLAGS

# The source projects' ResNet-18 at half width (2,797,610 parameters), CIFAR-10 test accuracy.
SOURCE_RESNET18_ACCURACY = (0.915, 0.947)
# Issue 16's targets on one H200. configs/fast.py: mean over seeds of the test accuracy with TTA, and of
# the training time (train_and_evaluate's wall time less compilation: benchmarks/time_to_accuracy.py).
FAST_ACCURACY, FAST_TRAIN_S = 0.935, 5.0
JAX_OVER_TORCH, PIPELINE_OVER_STEP = 1.0, 0.95
STOPPED = (124, 137)  # timeout's exit status: the part ran GRACE_S past its deadline and was stopped.


def read_parts(path: str) -> dict[str, dict[str, Any]]:
  """name: {'status', 'seconds', 'json', 'record' (the part's JSON, or None), 'skipped' (what it skipped)}."""
  parts = {}
  with open(path, newline='') as f:
    for name, status, seconds, json_path in csv.reader(f, delimiter='\t'):
      record = json.loads(Path(json_path).read_text()) if json_path else None
      skipped = skipped_in(record['results']) if record else []
      parts[name] = {
        'status': int(status),
        'seconds': int(seconds),
        'json': json_path,
        'record': record,
        'skipped': skipped,
      }
  return parts


def skipped_in(node: Any) -> list[str]:
  """Every reason under a 'skipped' key of a results tree (a list of them, or one)."""
  if not isinstance(node, dict):
    return []
  found = []
  for key, value in node.items():
    found += ([value] if isinstance(value, str) else value) if key == 'skipped' else skipped_in(value)
  return found


def results(parts: dict[str, dict[str, Any]], name: str) -> dict[str, Any] | None:
  record = parts.get(name, {}).get('record')
  return record and record['results']


def target(name: str, measured: str | None, met: bool | None, why_none: str = '') -> dict[str, Any]:
  """One target: what was measured (None, with why, where nothing was) and whether it is met."""
  return {'target': name, 'measured': measured or f'not measured: {why_none}', 'met': met}


def fast_target(fast: dict[str, Any] | None, part: str = 'fast') -> dict[str, Any]:
  """configs/fast.py's target, as the part `part` (fast: SGD, fast_muon: Muon) met it."""
  optimizer = ' with Muon' if part == 'fast_muon' else ''
  name = (
    f'configs/fast.py{optimizer}: mean test accuracy with TTA >= {FAST_ACCURACY:.1%}, '
    f'training time (wall - compilation) <= {FAST_TRAIN_S:g} s'
  )
  summary = (fast or {}).get('summary')
  if not summary:
    return target(name, None, None, f'no seed ran (see the {part} part)')
  accuracy, train_s = summary['tta_accuracy'], summary['train_s']
  std = 'n/a' if accuracy['std'] is None else f'{accuracy["std"]:.2%}'
  measured = (
    f'{accuracy["mean"]:.2%} ± {std} over {len(fast["runs"])} seed(s), training '
    f'{train_s["mean"]:.2f} s (compilation {summary["compile_s"]["mean"]:.1f} s apart)'
  )
  return target(name, measured, accuracy['mean'] >= FAST_ACCURACY and train_s['mean'] <= FAST_TRAIN_S)


def throughput_targets(throughput: dict[str, Any] | None) -> list[dict[str, Any]]:
  found = []
  for model, figures in (throughput or {'resnet18': {}, 'resnet34': {}}).items():
    ratio = figures.get('jax_over_torch')
    name = f'{model}: JAX / PyTorch train-step images/s >= {JAX_OVER_TORCH:g}'
    found.append(target(name, ratio and f'{ratio:.2f}', ratio and ratio >= JAX_OVER_TORCH, outcome(figures)))
    loops = {key: figures[key] for key in ('pipeline_over_step', 'scanned_pipeline_over_step') if key in figures}
    name = (
      f'{model}: device-pipeline loop >= {PIPELINE_OVER_STEP:.0%} of the bare step (the better of 1 and N steps a call)'
    )
    measured = ', '.join(f'{key} {value:.1%}' for key, value in loops.items())
    met = max(loops.values()) >= PIPELINE_OVER_STEP if loops else None
    found.append(target(name, measured, met, outcome(figures)))
  return found


def outcome(figures: dict[str, Any]) -> str:
  """Why a preset's throughput figures are missing."""
  if not figures:
    return 'the part did not run (see its log)'
  reasons = []
  for side in ('jax', 'torch'):
    if figures.get(side) is None:
      reasons.append(f'{side}: not importable')
    elif 'error' in figures[side] or 'skipped' in figures[side]:
      reasons.append(f'{side}: {figures[side].get("error") or figures[side]["skipped"]}')
  return '; '.join(reasons)


def resnet18_target(run: dict[str, Any] | None) -> dict[str, Any]:
  low, high = SOURCE_RESNET18_ACCURACY
  name = f"configs/resnet18.py in the time left: test accuracy against the source projects' {low:.1%}-{high:.1%}"
  if not (run and run['runs']):
    return target(name, None, None, '; '.join((run or {}).get('skipped', [])) or 'the part did not run')
  accuracy, epochs = run['runs'][0]['accuracy'], run['fit']['num_epochs']
  return target(name, f'{accuracy:.2%} after {epochs:g} epochs (the recipe: 200)', accuracy >= low)


def describe(met: bool | None) -> str:
  return {True: 'MET', False: 'missed', None: '-'}[met]


def first_device(parts: dict[str, dict[str, Any]]) -> str:
  devices = [part['record']['device'] for part in parts.values() if part['record']]
  return devices[0] if devices else 'unknown device'


def main(argv: list[str]):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  parts = read_parts(FLAGS.parts)
  targets = [
    fast_target(results(parts, 'fast')),
    fast_target(results(parts, 'fast_muon'), 'fast_muon'),
    *throughput_targets(results(parts, 'throughput')),
    resnet18_target(results(parts, 'resnet18')),
  ]
  tuning = (results(parts, 'tune') or {}).get('tuning', {})
  device = first_device(parts)
  print(f'\ngpu_suite on {device}: {FLAGS.wall_s:.0f} s of a {FLAGS.budget_s:.0f} s budget')
  for name, part in parts.items():
    stopped = ' (stopped: it ran past its deadline)' if part['status'] in STOPPED else ''
    skipped = f', skipped: {"; ".join(part["skipped"])}' if part['skipped'] else ''
    print(f'  {name:<11} exit {part["status"]}{stopped}, {part["seconds"]:>4} s{skipped}')
  if tuning:
    print(
      f'  tuned: {tuning.get("chosen", "nothing (the tuning was stopped)")} from {len(tuning["trials"])} run(s) '
      f'on {tuning["validation_size"]} validation images'
    )
  for found in targets:
    print(f'  [{describe(found["met"]):>6}] {found["target"]}: {found["measured"]}')
  summary = {
    'wall_s': FLAGS.wall_s,
    'within_budget': FLAGS.wall_s <= FLAGS.budget_s,
    'parts': {
      name: {key: part[key] for key in ('status', 'seconds', 'json', 'skipped')} for name, part in parts.items()
    },
    'tuned': tuning.get('chosen'),
    'targets': targets,
  }
  common.write_results('gpu_suite', device, {'budget_s': FLAGS.budget_s}, summary)
  failed = [name for name, part in parts.items() if part['status'] not in (0, *STOPPED)]
  if failed:
    sys.exit(f'failed parts: {", ".join(failed)} (see their output above)')


if __name__ == '__main__':
  app.run(main)
