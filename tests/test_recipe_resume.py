"""(slow) Each recipe of issue 29 on the smoke config resumes bitwise after a SIGKILL, as every other recipe does:
Muon (its momentum in the optimizer state) and AugMix with its consistency loss (its views drawn from the step)."""

import jax
import numpy as np
import pytest

from configs import augmix

from helpers import finished_steps, kill_after_first_checkpoint, load_checkpoint, overrides_of, run_smoke

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
