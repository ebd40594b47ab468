"""Compile once: runs that differ only in their traced hyperparameters (`train.hyperparams`) share the train
step, in one process and, through the persistent compilation cache, across processes."""

import json
import re
import sys

import pytest

from configs import smoke
from resnet_flax.errors import ConfigError
from resnet_flax.train import config_checks

from helpers import run_command, run_main


def test_three_seeds_and_three_learning_rates_compile_the_train_step_once(tmp_path):
  code, output = run_command(
    [sys.executable, 'tests/count_compiles.py', str(tmp_path)],
    devices=1,
    wait=True,
    env={'JAX_ENABLE_COMPILATION_CACHE': 'false'},
  )
  assert code == 0, output[-3000:]
  result = json.loads(output.strip().splitlines()[-1])
  assert result['shared'] == {'_init': 1, 'train_stack': 1, 'eval_step': 1}, result['shared']
  losses = {round(metrics['loss'], 6) for _, _, metrics in result['runs']}
  assert len(losses) == 9, result['runs']  # Every seed and rate reached the shared program: 9 different runs.
  assert result['alone'] == {'_init': 1, 'train_stack': 1, 'eval_step': 1}  # Its own program, compiled anew...
  assert result['again'] == result['runs'][-1][2]  # ...trains exactly as the shared one did.


@pytest.mark.slow  # Two main.py processes: a minute.
def test_a_second_process_with_another_seed_and_rate_loads_the_train_step_from_the_cache(tmp_path):
  cache = f'--compilation_cache_dir={tmp_path / "cache"}'
  train_step = re.compile(r'jit\(train_stack\) [\d.]+ s( \(persistent cache\))?')
  served = []
  for seed, learning_rate in ((0, 0.05), (1, 0.1)):
    overrides = (f'--config.seed={seed}', f'--config.optim.learning_rate={learning_rate}', '--config.num_epochs=0.5')
    code, output = run_main(tmp_path / f'seed{seed}', cache, *overrides)
    assert code == 0, output[-3000:]
    compiled = train_step.findall(output)
    assert len(compiled) == 1, output[-3000:]  # The trainer's line: 'Compiled ... jit(train_stack) 2.1 s ...'.
    served.append(bool(compiled[0]))
  assert served == [False, True]


def test_a_seed_the_int32_input_cannot_hold_is_refused_in_one_line():
  config = smoke.get_config()
  config.seed = 2**31
  with pytest.raises(ConfigError, match=r'^--config.seed=2147483648 is invalid: must be below 2\*\*31 .*int32\)$'):
    config_checks.validate(config)
