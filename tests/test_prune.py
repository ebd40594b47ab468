"""Gradual magnitude pruning (`prune.sparsity`): the schedule, the optax wrapper on toy parameters, the
config checks, and one tiny pruning run shared by the end-to-end tests.

The run (`pruned_run`): resnet_tiny on 576 synthetic images, 64 of them held out for validation (8 steps
an epoch), 2 epochs, pruned to 80% between steps 0 and 8 with the masks recomputed every 2 steps, an EMA
of the weights, checkpoints and evaluations every 4 steps, early stopping after 2 evaluations without a
better one. Its evaluations are a stand-in whose validation accuracy falls step by step, so a denser
checkpoint always looks better.
"""

import contextlib
import functools
import json
import logging
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict

from configs import smoke
from resnet_flax import evaluate, models, optim
from resnet_flax.compress import prune
from resnet_flax.errors import ConfigError
from resnet_flax.run import checkpoint, writers
from resnet_flax.run.workdir import RUN_FILE, Steps, check_resumable
from resnet_flax.train import config_checks, loop, trainer

from helpers import finished_steps, load_checkpoint, run_main, tiny_run_info

TARGET_STEP = 8
SCHEDULE = prune.Schedule(sparsity=0.8, start=0, end=TARGET_STEP, every=2)  # The run's, for 16 steps.
SPARED = (models.STEM, models.HEAD)  # Left dense by the default scope.


def pruned_config(**fields):
  """The config of `pruned_run`; `fields` are dotted config fields."""
  config = smoke.get_config()
  config.data.synthetic_train_size, config.data.validation_size = 576, 64
  config.num_epochs, config.eval_every_epochs, config.early_stopping_patience = 2.0, 0.5, 2
  config.checkpoint_every_steps, config.keep_checkpoints, config.log_every_steps = 4, 4, 2
  config.ema_decay = 0.9
  config.prune.sparsity, config.prune.end_fraction, config.prune.every_steps = 0.8, 0.5, 2
  config.update_from_flattened_dict(fields)
  return config


def kernels(params) -> dict[tuple[str, ...], np.ndarray]:
  return {path: np.asarray(leaf) for path, leaf in flatten_dict(params).items() if path[-1] == 'kernel'}


def scheduled_zeros(schedule: prune.Schedule, step: int, size: int) -> int:
  """The zeros of a pruned kernel after the mask update of `step`: the nearest integer to ramp x final zeros."""
  return round(float(schedule.ramp(step)) * schedule.final_zeros(size))


# The schedule.


def test_the_schedule_is_zhu_and_guptas_cubic_ramp():
  schedule = prune.Schedule(sparsity=0.8, start=10, end=30, every=6)
  values = np.array([schedule(step) for step in range(41)])
  assert np.all(values[:11] == 0) and np.all(values[30:] == np.float32(0.8))
  assert np.all(np.diff(values) >= 0)
  for step in range(10, 31):  # s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^3 with s_i = 0.
    assert values[step] == pytest.approx(0.8 + (0 - 0.8) * (1 - (step - 10) / 20) ** 3, rel=1e-6, abs=1e-7)
  assert values[20] == pytest.approx(0.8 * 7 / 8)  # Halfway, seven eighths of the target: cubic.
  assert [step for step in range(41) if schedule.updates_masks(step)] == [16, 22, 28, 30]


@pytest.mark.parametrize(
  'total, fractions, expected',
  [(195, (0.0, 0.75), (0, 146)), (10, (0.99, 1.0), (9, 10)), (1, (0.0, 0.75), (0, 1))],
  ids=['one_epoch_fine_tune', 'late_start', 'one_step'],
)
def test_the_schedule_counts_this_runs_steps(total, fractions, expected):
  config = pruned_config(**{'prune.start_fraction': fractions[0], 'prune.end_fraction': fractions[1]})
  schedule = prune.Schedule.of(config.prune, Steps(per_epoch=total, total=total, eval_every=total))
  assert (schedule.start, schedule.end) == expected


def test_the_final_zeros_are_at_least_the_target_in_every_kernel():
  schedule = prune.Schedule(sparsity=0.7, start=0, end=1, every=1)
  assert [schedule.final_zeros(size) for size in (10, 2304, 7)] == [7, 1613, 5]  # 0.7 * 10 is 7.000000000000001.


# The wrapper, on toy parameters.


def test_magnitude_mask_prunes_the_smallest_and_keeps_the_pruned_ones_pruned():
  weights = jnp.array([0.5, -0.1, 0.3, 2.0, -0.05, 0.2])
  already = jnp.array([True, True, True, False, True, True])  # 2.0 was pruned: it stays so.
  assert prune.magnitude_mask(weights, already, 3).tolist() == [True, False, True, False, False, True]


TOY_SHAPES = {
  models.STEM: {'kernel': (3, 3, 3, 8)},
  'Conv_0': {'kernel': (3, 3, 8, 8)},
  'norm': {'scale': (8,), 'bias': (8,)},
  models.HEAD: {'kernel': (8, 10), 'bias': (10,)},
}


@pytest.mark.parametrize(
  'freeze, scope, pruned',
  [
    ('none', 'hidden', {'Conv_0'}),
    ('none', 'all', {models.STEM, 'Conv_0', models.HEAD}),
    ('backbone', 'hidden+classifier', {models.HEAD}),
  ],
)
def test_the_wrapper_prunes_on_schedule_and_pruned_weights_never_regrow(freeze, scope, pruned):
  config = pruned_config(**{'optim.freeze': freeze, 'prune.scope': scope})
  schedule = prune.Schedule(sparsity=0.8, start=2, end=10, every=3)  # Masks change at steps 5, 8 and 10.
  select = functools.partial(prune.pruned_paths, scope=scope, freeze=freeze)
  tx = prune.masked(optim.create_optimizer(config.optim, optax.constant_schedule(0.1)), schedule, select)
  keys = iter(jax.random.split(jax.random.key(0), 6))
  initial = jax.tree.map(
    lambda shape: jax.random.normal(next(keys), shape), TOY_SHAPES, is_leaf=lambda x: type(x) is tuple
  )

  @jax.jit
  def step(params, state):
    grads = jax.tree.map(lambda p: -jnp.ones_like(p), params)  # Pushes every weight, a pruned one too, up.
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params, state, zeros_before = initial, tx.init(initial), {}
  for t in range(1, 13):
    params, state = step(params, state)
    masks = flatten_dict(state.masks)
    last_update = max(s for s in (0, 5, 8, 10) if s <= t)
    for path, leaf in flatten_dict(params).items():
      zeros = np.asarray(leaf) == 0
      if path[-1] == 'kernel' and path[0] in pruned:
        assert zeros.sum() == scheduled_zeros(schedule, last_update, leaf.size), (t, path)
        assert np.array_equal(zeros, ~masks[path])
        assert np.all(zeros >= zeros_before.get(path, False)), (t, path)  # Nothing regrows.
        zeros_before[path] = zeros
      elif freeze == 'backbone' and path[0] != models.HEAD:
        np.testing.assert_array_equal(leaf, flatten_dict(initial)[path])
      else:
        assert not zeros.any(), (t, path)
  assert all(zeros.sum() == math.ceil(0.8 * zeros.size) for zeros in zeros_before.values())


# Config checks.


@pytest.mark.parametrize(
  'fields, message',
  [
    ({'prune.sparsity': 1.0}, r'prune.sparsity=1.0 is invalid: must be in \[0, 1\)'),
    ({'prune.sparsity': -0.5}, r'prune.sparsity=-0.5 is invalid: must be in \[0, 1\)'),
    ({'prune.end_fraction': 1.5}, r'prune.end_fraction=1.5 is invalid: must be in \[0, 1\]'),
    ({'prune.start_fraction': 0.6}, r'prune.end_fraction=0.5 is not after prune.start_fraction=0.6'),
    ({'prune.every_steps': 0}, r'prune.every_steps=0 is invalid: must be > 0'),
    ({'prune.scope': 'stem'}, r"prune.scope='stem' is invalid: choose one of hidden, hidden\+stem, .*all"),
    (
      {'optim.freeze': 'backbone'},
      r'prunes nothing with optim.freeze=backbone .* --config.prune.scope=hidden\+classifier',
    ),
  ],
)
def test_bad_values_are_refused_in_one_line(fields, message):
  config_checks.validate(pruned_config(**{'optim.freeze': 'backbone', 'prune.scope': 'hidden+classifier'}))
  with pytest.raises(ConfigError, match=message) as error:
    config_checks.validate(pruned_config(**fields))
  assert '\n' not in str(error.value)


# A tiny pruning run.


@contextlib.contextmanager
def falling_validation_accuracy():
  """Evaluations give accuracy 1 - step / 100, and the training loop runs under transfer_guard('disallow')
  (every host read, the logged sparsity's too, is an explicit device_get)."""
  run = loop.TrainLoop.run

  def guarded_run(self, state, start_step):
    with jax.transfer_guard('disallow'):
      return run(self, state, start_step)

  def stand_in(eval_fn, state, batches):
    step = int(jax.device_get(state.step))
    return {'accuracy': 1 - step / 100, 'loss': step / 100}

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(trainer, 'compute_eval_metrics', stand_in)
    patch.setattr(loop.TrainLoop, 'run', guarded_run)
    yield


@pytest.fixture(scope='module')
def pruned_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('pruned')
  with falling_validation_accuracy():
    trainer.train_and_evaluate(pruned_config(), str(workdir))
  return workdir


def test_every_checkpoint_holds_exactly_the_scheduled_zeros(pruned_run):
  assert finished_steps(pruned_run) == [4, 8, 12, 16]  # Early stopping counted no evaluation before step 8.
  zeros_before = {}
  for step in finished_steps(pruned_run):
    saved = load_checkpoint(pruned_run, step)
    params, ema = kernels(saved['params']), kernels(saved['ema']['params'])
    masks = flatten_dict(saved['opt_state']['masks'])
    for path, kernel in params.items():
      zeros = kernel == 0
      if path[0] in SPARED:
        assert not zeros.any() and path not in masks
        continue
      assert zeros.sum() == scheduled_zeros(SCHEDULE, min(step, TARGET_STEP), kernel.size), (step, path)
      assert np.array_equal(ema[path] == 0, zeros) and np.array_equal(~masks[path], zeros), (step, path)
      assert np.all(zeros >= zeros_before.get(path, False)), (step, path)
      zeros_before[path] = zeros


def test_best_is_never_a_checkpoint_from_before_the_target(pruned_run):
  manager = checkpoint.open_checkpoints(str(pruned_run))
  assert manager.metrics(4) is None  # Its validation accuracy, 0.96, is the highest of all.
  assert checkpoint.best_step(manager) == TARGET_STEP
  manager.close()


def test_training_logs_the_sparsity_of_the_weights(pruned_run):
  sizes = [
    kernel.size for path, kernel in kernels(load_checkpoint(pruned_run, 4)['params']).items() if path[0] not in SPARED
  ]
  expected = {
    step: sum(scheduled_zeros(SCHEDULE, min(step, TARGET_STEP), size) for size in sizes) / sum(sizes)
    for step in range(2, 17, 2)
  }
  assert dict(writers.read_scalars(str(pruned_run))['train_sparsity']) == pytest.approx(expected, rel=1e-6)


def test_evaluate_reports_the_zeros_of_the_restored_weights(pruned_run):
  report = evaluate.evaluate_checkpoint(pruned_config(), str(pruned_run))
  assert report['checkpoint_step'] == TARGET_STEP
  ema = flatten_dict(load_checkpoint(pruned_run, TARGET_STEP)['ema']['params'])
  pruned = {path: leaf.size for path, leaf in ema.items() if path[-1] == 'kernel' and path[0] not in SPARED}
  assert report['sparsity'] == {
    'target': 0.8,
    'scope': 'hidden',
    'kernels': sum(map(SCHEDULE.final_zeros, pruned.values())) / sum(pruned.values()),
    'all_parameters': sum(int(np.sum(leaf == 0)) for leaf in ema.values()) / sum(leaf.size for leaf in ema.values()),
    'per_kernel': {'/'.join(path): SCHEDULE.final_zeros(size) / size for path, size in pruned.items()},
  }
  assert report['sparsity']['kernels'] >= 0.8


def test_a_resume_mid_pruning_is_bitwise_identical(pruned_run, tmp_path, caplog):
  shutil.copytree(pruned_run, tmp_path, dirs_exist_ok=True)
  for step in (8, 12, 16):
    shutil.rmtree(tmp_path / 'checkpoints' / str(step))
  with falling_validation_accuracy(), caplog.at_level(logging.INFO):
    trainer.train_and_evaluate(pruned_config(), str(tmp_path))
  assert 'Resuming from the checkpoint of step 4' in caplog.text
  resumed, straight = load_checkpoint(tmp_path, 16), load_checkpoint(pruned_run, 16)
  assert flatten_dict(resumed['opt_state']['masks'])  # Params, statistics, EMA, optimizer state with the masks.
  jax.tree.map(np.testing.assert_array_equal, resumed, straight)


@pytest.mark.slow
def test_a_one_epoch_fine_tune_with_sam_from_the_command_line(straight_run, tmp_path):
  args = [f'--config.init_from={straight_run}', '--config.num_epochs=1', '--config.prune.sparsity=0.8']
  returncode, output = run_main(tmp_path, *args, '--config.optim.name=sam')
  assert returncode == 0, output
  assert 'train_sparsity=0.800' in output
  returncode, output = run_main(tmp_path, '--mode=evaluate')
  assert returncode == 0, output
  sparsity = json.loads(next((tmp_path / 'eval').glob('*/report.json')).read_text())['sparsity']
  assert sparsity['kernels'] >= 0.8 and min(sparsity['per_kernel'].values()) >= 0.8


@pytest.mark.parametrize('before, after', [(0.8, 0.0), (0.0, 0.8), (0.8, 0.5)])
def test_a_resume_that_switches_or_changes_pruning_is_refused(tmp_path, before, after):
  """The masks live in the optimizer state: another layout would not restore (and must not start over)."""

  def run_info(sparsity):
    config = smoke.get_config()
    config.prune.sparsity = sparsity
    return tiny_run_info(prune=prune.run_record(config.prune))

  (tmp_path / RUN_FILE).write_text(json.dumps(run_info(before).to_json()))
  check_resumable(str(tmp_path), run_info(before))
  with pytest.raises(ConfigError, match='pruning .*prune: '):
    check_resumable(str(tmp_path), run_info(after))
