"""(slow) The recipes of issue 29. Each on the smoke config resumes bitwise after a SIGKILL, as every other recipe
does: Muon (its momentum in the optimizer state) and AugMix with its consistency loss (its views drawn from the
step); configs/augmix.py itself trains a few steps on the real CIFAR-10 folder."""

import sys

import jax
import numpy as np
import pytest

from configs import augmix
from resnet_flax.run import writers

from helpers import (
  COMPILATION_CACHE,
  finished_steps,
  kill_after_first_checkpoint,
  load_checkpoint,
  overrides_of,
  run_command,
  run_smoke,
)

RECIPES = {
  'muon': ['--config.optim.name=muon'],
  'augmix': overrides_of(augmix.add_augmix),
}


@pytest.fixture(scope='module', params=sorted(RECIPES))
def uninterrupted(request, tmp_path_factory):
  """(the recipe's overrides, the workdir of its uninterrupted smoke run)."""
  overrides = RECIPES[request.param]
  workdir = tmp_path_factory.mktemp(f'{request.param}_straight')
  returncode, output = run_smoke(workdir, *overrides)
  assert returncode == 0, output
  return overrides, workdir


@pytest.mark.slow
def test_the_recipe_resumes_bitwise_after_a_kill(uninterrupted, tmp_path):
  overrides, straight = uninterrupted
  killed_at = kill_after_first_checkpoint(tmp_path, *overrides)
  assert killed_at and killed_at[-1] < finished_steps(straight)[-1]
  returncode, output = run_smoke(tmp_path, *overrides)
  assert returncode == 0 and f'Resuming from the checkpoint of step {killed_at[-1]}' in output, output
  last = finished_steps(straight)[-1]
  resumed, final = load_checkpoint(tmp_path, last), load_checkpoint(straight, last)
  for name in ('params', 'batch_stats', 'opt_state', 'step'):
    jax.tree.map(np.testing.assert_array_equal, resumed[name], final[name])


@pytest.mark.slow
def test_configs_augmix_trains_a_few_steps_on_the_cifar10_folder(cifar10_jpeg_dir, tmp_path):
  command = [sys.executable, 'main.py', '--config=configs/augmix.py', f'--workdir={tmp_path}']
  command += [f'--config.data.path={cifar10_jpeg_dir}', '--config.num_epochs=0.01', '--config.log_every_steps=1']
  returncode, output = run_command([*command, f'--compilation_cache_dir={COMPILATION_CACHE}'], 1, True)
  assert returncode == 0, output[-3000:]
  losses = [loss for _, loss in writers.read_scalars(str(tmp_path))['train_loss']]
  assert len(losses) == 2 and np.all(np.isfinite(losses)), losses  # 0.01 of 50,000 images, batches of 256.
