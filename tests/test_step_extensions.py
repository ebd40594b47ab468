"""A step extension registered from outside the package reaches the train step through the config alone.

`LogitPenalty` adds weight x the mean squared L2 norm of the logits to the loss (the penalty of
"logit squeezing"); its weight enters the compiled step as an argument. Trained for the same steps from
the same weights and batches, the penalised run's logits on the test images are smaller than plain
training's, and its other leaves are where only the loss could have moved them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import smoke
from resnet_flax import models, step_extensions
from resnet_flax.train import step, trainer

from helpers import restore_smoke_run

WEIGHT = 0.05


class LogitPenalty(step_extensions.StepExtension):
  name = 'logit_penalty'

  def __init__(self, weight: float):
    self.weight = weight

  @classmethod
  def create(cls, config, train_split, steps):
    weight = config.get('logit_penalty', 0.0)
    return cls(weight) if weight else None

  def arguments(self):
    return {'weight': np.float32(self.weight)}

  def loss(self, args, context, aux, loss):
    penalty = jnp.mean(jnp.sum(jnp.square(loss.logits.astype(jnp.float32)), axis=-1))
    return loss._replace(value=loss.value + args['weight'] * penalty)


@pytest.fixture
def registered():
  step_extensions.register(LogitPenalty)
  yield
  del step_extensions.REGISTRY[LogitPenalty.name]


def config_with(**fields) -> ml_collections.ConfigDict:
  config = smoke.get_config()
  config.num_epochs = 1.0
  with config.unlocked():
    config.update(fields)
  return config


def mean_logit_norm(workdir) -> float:
  """The mean L2 norm of the logits of the test images, by the run's final weights."""
  restored, split = restore_smoke_run(workdir)
  info = restored.run.info
  logits = models.apply_to_pixels(
    restored.model.apply, restored.variables, split.images, info.pixel_mean, info.pixel_std
  )
  return float(jnp.mean(jnp.linalg.norm(logits, axis=-1)))


def test_a_registered_extension_changes_training_through_the_config(registered, tmp_path):
  plain, penalised = tmp_path / 'plain', tmp_path / 'penalised'
  trainer.train_and_evaluate(config_with(), str(plain))
  trainer.train_and_evaluate(config_with(logit_penalty=WEIGHT), str(penalised))
  assert mean_logit_norm(penalised) < 0.8 * mean_logit_norm(plain)


def test_its_weight_reaches_the_compiled_step_as_an_argument(registered, tmp_path):
  setup = trainer.set_up(config_with(logit_penalty=WEIGHT), str(tmp_path))
  assert [extension.name for extension in setup.spec.extensions] == [LogitPenalty.name]
  assert setup.spec.arguments() == {LogitPenalty.name: {'weight': np.float32(WEIGHT)}}
  rng = np.random.default_rng(0)
  batch = {
    'image': rng.integers(0, 256, (64, 32, 32, 3), np.uint8),
    'label': rng.integers(0, 10, 64).astype(np.int32),
    'index': np.arange(64, dtype=np.int32),
  }
  train = jax.jit(functools.partial(step.train_step, spec=setup.spec))
  loss = lambda weight: float(
    train(setup.state, batch, setup.hparams, {LogitPenalty.name: {'weight': np.float32(weight)}})[1].loss.compute()
  )
  assert loss(WEIGHT) > loss(0.0) + 1e-3  # One program, whatever the weight.
  assert train._cache_size() == 1
