"""Adversarial training: the images a step trains on are attacks inside the ball, and the overfitting
guard stops a run whose held-out PGD accuracy collapses, without letting that model become the best."""

import contextlib
import itertools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import smoke
from resnet_flax.data import augment
from resnet_flax.errors import ConfigError
from resnet_flax.robust import adversarial
from resnet_flax.run import checkpoint
from resnet_flax.train import config_checks, step, trainer

from helpers import restore_smoke_run

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture(scope='module')
def trained(straight_run):
  """(logits of normalised images, normalised test images, one-hot targets) of the trained smoke run."""
  restored, split = restore_smoke_run(straight_run)
  logits_fn = jax.jit(lambda x: restored.model.apply(restored.variables, x, train=False))
  images = augment.normalize(split.images[:32], MEAN, STD)
  return logits_fn, images, jax.nn.one_hot(split.labels[:32], restored.run.info.num_classes)


@pytest.mark.parametrize('method', ['fgsm_rs', 'pgd', 'trades'])
def test_training_images_are_attacks_inside_the_ball(trained, method):
  logits_fn, images, targets = trained
  config = smoke.get_config().adversarial
  config.method, config.epsilon, config.steps = method, 16 / 255, 3
  objective = adversarial.trades_objective if method == 'trades' else adversarial.cross_entropy_objective(targets)
  args, steps = adversarial.attack_arguments(config), adversarial.num_steps(config)
  attacked = adversarial.perturb(logits_fn, images, objective, jax.random.key(0), args, steps, MEAN, STD)
  pixels = lambda x: np.asarray(x) * np.array(STD) + np.array(MEAN)
  distance = np.abs(pixels(attacked) - pixels(images)).max()
  assert 0.5 * config.epsilon < distance <= config.epsilon + 1e-5
  assert pixels(attacked).min() >= -1e-5 and pixels(attacked).max() <= 1 + 1e-5
  clean_logits, attacked_logits = logits_fn(images), logits_fn(attacked)
  if method == 'trades':  # It moves the prediction away from the clean one.
    assert float(adversarial.kl_from_clean(clean_logits, attacked_logits).mean()) > 1e-3
  else:  # It raises the loss it trains on.
    loss = lambda logits: float(jnp.mean(step.cross_entropy(logits, targets)))
    assert loss(attacked_logits) > loss(clean_logits) + 0.05


def test_guard_stops_at_a_drop_below_the_best():
  guard = adversarial.Guard(drop=0.2, what='a batch')
  metric = lambda accuracy: {adversarial.GUARD_METRIC: accuracy}
  assert not any(guard.update(step, metric(a)) for step, a in [(10, 0.3), (20, 0.45), (30, 0.3), (40, 0.4)])
  assert guard.update(50, metric(0.2))
  assert 'fell from 0.4500 (step 20) to 0.2000' in guard.reason()
  assert not adversarial.Guard(drop=0.0, what='a batch').update(10, metric(0.0))  # 0: off.


@pytest.mark.slow
def test_the_guard_ends_training_and_the_collapsed_model_never_ranks(tmp_path, monkeypatch, caplog):
  """Scripted guard accuracies collapse at the 3rd evaluation: training stops there with a checkpoint,
  and the best checkpoint stays one from before, though that one's validation accuracy is lower."""
  config = smoke.get_config()
  config.adversarial.method, config.num_epochs, config.data.validation_size = 'fgsm_rs', 4.0, 128
  config.keep_checkpoints = 5
  guard_accuracies = iter([0.3, 0.4, 0.05, 0.05])
  monkeypatch.setattr(
    adversarial,
    'guard_metric_fn',
    lambda *args: lambda variables, batch: {adversarial.GUARD_METRIC: next(guard_accuracies)},
  )
  accuracies = itertools.chain([0.5, 0.6, 0.9], itertools.repeat(0.95))  # The collapsed model looks best.
  monkeypatch.setattr(trainer, 'compute_eval_metrics', lambda *args: {'accuracy': next(accuracies), 'loss': 1.0})
  with caplog.at_level(logging.INFO):
    trainer.train_and_evaluate(config, str(tmp_path))
  steps_per_epoch = (512 - 128) // config.batch_size
  stopped = 3 * steps_per_epoch
  assert f'catastrophic overfitting at step {stopped}' in caplog.text
  assert f'fell from 0.4000 (step {2 * steps_per_epoch}) to 0.0500' in caplog.text
  with contextlib.closing(checkpoint.open_checkpoints(str(tmp_path))) as manager:
    assert max(manager.all_steps()) == stopped  # Saved (nothing is lost) ...
    assert checkpoint.best_step(manager) == 2 * steps_per_epoch  # ... but not the best.


def test_adversarial_training_with_a_teacher_is_refused_in_one_line():
  config = smoke.get_config()
  config.adversarial.method, config.distill.teacher = 'pgd', 'runs/teacher'
  with pytest.raises(ConfigError, match='adversarial training with distillation') as error:
    config_checks.validate(config)
  assert '\n' not in str(error.value)
