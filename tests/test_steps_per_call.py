"""Several train steps per compiled call (`steps_per_call`, a lax.scan) train as single steps do."""

import functools

import jax
import numpy as np
import pytest

from configs import smoke
from resnet_flax import models
from resnet_flax.errors import ConfigError
from resnet_flax.run import writers
from resnet_flax.run.workdir import Steps
from resnet_flax.train import hyperparams, step, trainer

from helpers import finished_steps, load_checkpoint

NUM_CLASSES, STEPS, BATCH, SIZE = 10, 4, 16, 8
STEPS_PER_EPOCH = 8


def tiny_smoke_config(**overrides):
  """The smoke recipe on 8x8 images: XLA:CPU is slow at convolutions inside loops (jax#12868)."""
  config = smoke.get_config()
  config.data.synthetic_image_size = SIZE
  config.data.synthetic_train_size = 128
  config.data.synthetic_test_size = 40
  config.batch_size = config.eval_batch_size = BATCH
  config.log_every_steps = 6
  config.checkpoint_every_steps = 5
  for field, value in overrides.items():
    config[field] = value
  return config


def test_scanned_steps_equal_the_steps_one_by_one():
  config = tiny_smoke_config()
  model = models.create_model_from_config(config, NUM_CLASSES)
  steps = Steps.of(config, STEPS_PER_EPOCH * config.batch_size)
  spec = step.create_spec(config, model, steps, (0.5,) * 3, (0.25,) * 3, NUM_CLASSES)
  hparams = hyperparams.of(config)
  learning_rate_fn = spec.learning_rate_fn(hparams)
  state = step.create_train_state(
    models.init_variables(model, (SIZE, SIZE, 3), jax.random.key(0)), spec.optimizer(hparams)
  )
  rng = np.random.default_rng(0)
  batches = {
    'image': rng.integers(0, 256, (STEPS, BATCH, SIZE, SIZE, 3), dtype=np.uint8),
    'label': rng.integers(0, NUM_CLASSES, (STEPS, BATCH)).astype(np.int32),
    'index': np.tile(np.arange(BATCH, dtype=np.int32), (STEPS, 1)),
  }
  train_fn = jax.jit(lambda state, stack: step.train_stack(state, stack, hparams, {}, spec=spec))

  one_by_one, step_metrics = state, []
  for i in range(STEPS):
    one_by_one, metrics = train_fn(one_by_one, jax.tree.map(lambda x, i=i: x[i : i + 1], batches))
    step_metrics.append(metrics)
  scanned, scanned_metrics = train_fn(state, batches)

  assert int(scanned.step) == int(one_by_one.step) == STEPS
  # The same arithmetic, compiled as a loop body: equal to the last bits or nearly.
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
    (scanned.params, scanned.batch_stats, scanned.opt_state),
    (one_by_one.params, one_by_one.batch_stats, one_by_one.opt_state),
  )
  merged = functools.reduce(lambda a, b: a.merge(b), step_metrics).compute()
  for name, value in scanned_metrics.compute().items():
    np.testing.assert_allclose(value, merged[name], rtol=1e-6)
  assert float(scanned_metrics.compute()['learning_rate']) == float(learning_rate_fn(STEPS - 1))


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """The tiny smoke run with one step per call and with calls of up to 4 steps."""
  workdirs = {}
  for steps_per_call in (1, 4):
    workdirs[steps_per_call] = tmp_path_factory.mktemp(f'steps_per_call_{steps_per_call}')
    trainer.train_and_evaluate(tiny_smoke_config(steps_per_call=steps_per_call), str(workdirs[steps_per_call]))
  return workdirs


def test_the_loop_logs_evaluates_and_saves_at_the_same_steps(runs):
  # Calls of steps 1-4, 5 (save), 6 (log), 7-8 (epoch end, eval), 9-10 (save), 11-12 (log), 13-15, 16.
  one, many = writers.read_scalars(str(runs[1])), writers.read_scalars(str(runs[4]))
  for tag in ('train_loss', 'train_accuracy', 'train_learning_rate', 'eval_loss', 'eval_accuracy'):
    assert [step for step, _ in many[tag]] == [step for step, _ in one[tag]], tag
    np.testing.assert_allclose([v for _, v in many[tag]], [v for _, v in one[tag]], rtol=1e-4, atol=1e-5)
  assert [step for step, _ in one['train_loss']] == [6, 12, 16]
  assert finished_steps(runs[4]) == finished_steps(runs[1])
  last = finished_steps(runs[1])[-1]
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5),
    load_checkpoint(runs[4], last)['params'],
    load_checkpoint(runs[1], last)['params'],
  )


def test_steps_per_call_must_be_positive(tmp_path):
  with pytest.raises(ConfigError, match=r'--config.steps_per_call=0 is invalid: must be > 0'):
    trainer.train_and_evaluate(tiny_smoke_config(steps_per_call=0), str(tmp_path))
