"""Adversarial training: the images a step trains on are attacks inside the ball, the train step's loss and
update are those of the attacked batch (TRADES': the clean loss plus beta x the KL), and the overfitting
guard stops a run whose held-out PGD accuracy collapses, without letting that model become the best."""

import contextlib
import dataclasses
import functools
import itertools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from scipy.special import log_softmax

from configs import smoke
from resnet_flax import step_extensions
from resnet_flax.data import augment
from resnet_flax.errors import ConfigError
from resnet_flax.robust import adversarial
from resnet_flax.run import checkpoint, writers
from resnet_flax.run.workdir import epoch_of
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


# The train step with an extension, against the plain step given the images attacked outside it (with the step's
# own augmentation, keys and forward pass), from the trained smoke run at a learning rate above 0.


class GivenImages(step_extensions.StepExtension):
  """Trains on the images of its argument instead of the step's."""

  name = 'given_images'

  def prepare(self, args, context, batch):
    return batch._replace(images=args['images']), None


@pytest.fixture(scope='module')
def one_step(straight_run, tmp_path_factory):
  """(the plain step's spec and hyperparameters, the trained smoke run's state, a uint8 batch of its training
  images)."""
  config = smoke.get_config()
  config.optim.warmup_epochs = 0.0  # The update of step 0 shows the gradients.
  setup = trainer.set_up(config, str(tmp_path_factory.mktemp('adversarial_step')))
  restored, _ = restore_smoke_run(straight_run)
  state = setup.state.replace(params=restored.variables['params'], batch_stats=restored.variables['batch_stats'])
  images, labels = setup.train_split.images[:64], setup.train_split.labels[:64]
  return setup.spec, setup.hparams, state, {'image': images, 'label': labels, 'index': np.arange(64, dtype=np.int32)}


def adversarial_config(method: str):
  config = smoke.get_config().adversarial
  config.method, config.epsilon, config.steps = method, 16 / 255, 2
  return config


def compiled_step(spec, hparams, extension=None):
  """(state, batch, the extension's arguments) -> (reported loss, updated parameters, flattened)."""
  spec = dataclasses.replace(spec, extensions=(extension,) if extension else ())
  name = extension.name if extension else None
  train = jax.jit(
    lambda state, batch, args: step.train_step(state, batch, hparams, {name: args} if name else {}, spec=spec)
  )

  def run(state, batch, args=None):
    new_state, metrics = train(state, batch, args)
    return float(metrics.loss.compute()), np.asarray(ravel_pytree(new_state.params)[0])

  return run


def attack_outside(spec, hparams, extension, train_mode: bool, objective):
  """(state, batch) -> (the step's augmented images, them attacked, the train-mode logits of each), attacked as
  the step at `state.step` would: its key, its forward pass (`train_mode`) or inference, `objective(targets)`."""
  return jax.jit(
    functools.partial(
      attacked, spec=spec, hparams=hparams, extension=extension, train_mode=train_mode, objective=objective
    )
  )


def attacked(state, batch, *, spec, hparams, extension, train_mode, objective):
  step_key = jax.random.fold_in(jax.random.key(hparams['seed']), state.step)
  augment_key, mix_key, dropout_key = jax.random.split(step_key, 3)
  epoch = epoch_of(state.step, spec.steps_per_epoch)
  images, targets = step.augmented_batch(batch, augment_key, mix_key, epoch, hparams, spec)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  apply = spec.model.apply
  train = lambda x: apply(variables, x, train=True, mutable=['batch_stats'], rngs={'dropout': dropout_key})[0]
  logits_fn = train if train_mode else lambda x: apply(variables, x, train=False)
  attack_key = jax.random.fold_in(step_key, adversarial.ATTACK_STREAM)
  args, steps = extension.arguments(), extension.steps
  adversarial_images = adversarial.perturb(
    logits_fn, images, objective(targets), attack_key, args, steps, spec.mean, spec.std
  )
  return images, adversarial_images, train(images), train(adversarial_images)


@pytest.mark.parametrize('method', ['fgsm_rs', 'pgd'])
def test_the_step_trains_on_the_attacked_batch(one_step, method):
  spec, hparams, state, batch = one_step
  extension = adversarial.AdversarialTraining(adversarial_config(method))
  args = extension.arguments()
  attack = attack_outside(spec, hparams, extension, train_mode=True, objective=adversarial.cross_entropy_objective)
  clean, attacked_images, _, _ = attack(state, batch)
  loss, params = compiled_step(spec, hparams, extension)(state, batch, args)
  given = compiled_step(spec, hparams, GivenImages())
  attacked_loss, attacked_params = given(state, batch, {'images': attacked_images})
  clean_loss, clean_params = given(state, batch, {'images': clean})
  assert loss == pytest.approx(attacked_loss, rel=1e-4)
  assert loss > clean_loss + 0.1  # The attack raised the loss: training on clean images cannot pass.
  start = np.asarray(ravel_pytree(state.params)[0])
  update, attacked_update, clean_update = params - start, attacked_params - start, clean_params - start
  assert np.linalg.norm(update - attacked_update) < 1e-3 * np.linalg.norm(update)  # The gradients of that loss.
  assert np.linalg.norm(update - clean_update) > 0.1 * np.linalg.norm(update)


def test_trades_adds_beta_times_the_kl_from_the_clean_to_the_attacked_prediction(one_step):
  spec, hparams, state, batch = one_step
  extension = adversarial.Trades(adversarial_config('trades'))
  args = extension.arguments()
  attack = attack_outside(
    spec, hparams, extension, train_mode=False, objective=lambda targets: adversarial.trades_objective
  )
  _, _, clean_logits, attacked_logits = attack(state, batch)
  clean, attacked_prediction = (
    log_softmax(np.asarray(x, np.float64), axis=-1) for x in (clean_logits, attacked_logits)
  )
  kl = np.mean(np.sum(np.exp(clean) * (clean - attacked_prediction), axis=-1))
  assert kl > 1e-3  # The attack moved the prediction: dropping it cannot pass.
  trades = compiled_step(spec, hparams, extension)
  loss = lambda beta: trades(state, batch, {**args, 'beta': np.float32(beta)})[0]
  clean_loss = compiled_step(spec, hparams)(state, batch)[0]
  assert loss(0.0) == pytest.approx(clean_loss, rel=1e-6)  # Cross-entropy on the clean images.
  assert loss(args['beta']) - loss(0.0) == pytest.approx(args['beta'] * kl, rel=1e-3)


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


def guard_stop(accuracies: list[tuple[int, float]], drop: float) -> tuple[int, int, float, float] | None:
  """(step, best step, best accuracy, accuracy) of the first evaluation more than `drop` below the best before it."""
  best_step, best = 0, -math.inf
  for at, accuracy in accuracies:
    if accuracy < best - drop:
      return at, best_step, best, accuracy
    if accuracy > best:
      best_step, best = at, accuracy
  return None


@pytest.mark.slow
def test_real_catastrophic_overfitting_stops_the_run_and_never_ranks(tmp_path, caplog):
  """Nothing scripted: FGSM training at 32/255 with the step of 2 epsilon that Wong et al. saw overfit, at a high rate,
  overfits catastrophically on the smoke data (measured: the PGD-5 accuracy of the validation batch falls from 0.55 to
  0.16 in one epoch as the clean validation accuracy jumps to 1.0). The guard stops the run where the accuracies it
  recorded say, and the best checkpoint stays the best one from before, though the collapsed one looks better."""
  config = smoke.get_config()
  config.data.validation_size, config.num_epochs, config.keep_checkpoints = 128, 10.0, 11
  config.optim.learning_rate = 0.2
  config.adversarial.update(method='fgsm_rs', epsilon=32 / 255, step_size=64 / 255)  # guard_drop: the default 0.2.
  with caplog.at_level(logging.INFO):
    trainer.train_and_evaluate(config, str(tmp_path))
  scalars = writers.read_scalars(str(tmp_path))
  guarded = scalars[f'eval_{adversarial.GUARD_METRIC}']
  stop = guard_stop(guarded, config.adversarial.guard_drop)
  assert stop and stop[0] < 10 * 6, guarded  # It stopped before the end (6 steps an epoch) ...
  stopped_at, best_step, best, fell_to = stop
  assert guarded[-1][0] == stopped_at  # ... at that evaluation.
  assert f'catastrophic overfitting at step {stopped_at}' in caplog.text
  assert f'fell from {best:.4f} (step {best_step}) to {fell_to:.4f}' in caplog.text
  validation = dict(scalars['eval_accuracy'])
  ranked = {at: accuracy for at, accuracy in validation.items() if at < stopped_at}
  with contextlib.closing(checkpoint.open_checkpoints(str(tmp_path))) as manager:
    assert max(manager.all_steps()) == stopped_at
    assert checkpoint.best_step(manager) == max(ranked, key=ranked.get)
  assert validation[stopped_at] > max(ranked.values())  # The collapsed model would have been the best.


def test_adversarial_training_with_a_teacher_is_refused_in_one_line():
  config = smoke.get_config()
  config.adversarial.method, config.distill.teacher = 'pgd', 'runs/teacher'
  with pytest.raises(ConfigError, match='adversarial training with distillation') as error:
    config_checks.validate(config)
  assert '\n' not in str(error.value)
