"""Training options of the recipes: optimizers, SAM, schedules, EMA, label smoothing, weight decay."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default, smoke
from resnet_flax import evaluate, models, optim
from resnet_flax.data import mixing
from resnet_flax.errors import ConfigError
from resnet_flax.run.workdir import Steps
from resnet_flax.train import config_checks, hyperparams, step, trainer

CURVATURE = jnp.array([1.0, 10.0])  # f(w) = 1/2 sum(a * w^2): gradient a * w.


def quadratic_grad_fn(w):
  loss = 0.5 * jnp.sum(CURVATURE * w * w)
  return (loss, None), CURVATURE * w


@pytest.mark.parametrize('adaptive', [False, True])
def test_sam_gradient_is_taken_at_the_ascent_point(adaptive):
  w = jnp.array([1.0, 1.0])
  (_, _), g = quadratic_grad_fn(w)
  rho = 0.1
  scale = jnp.abs(w) if adaptive else jnp.ones_like(w)
  ascent = rho * scale**2 * g / jnp.linalg.norm(scale * g)
  expected = CURVATURE * (w + ascent)
  sam = optim.sam_gradients(quadratic_grad_fn, w, g, rho, adaptive)
  np.testing.assert_allclose(sam, expected, rtol=1e-6)
  # The ascent moves furthest along the sharp direction, so SAM's gradient grows most there.
  assert (sam - g)[1] > (sam - g)[0] > 0


def test_ema_equals_its_closed_form():
  decay, values = 0.9, [jnp.full((3,), float(v)) for v in (1, 5, -2, 7)]
  ema = {'params': {'w': jnp.zeros(3)}, 'batch_stats': {'m': jnp.ones(3)}}
  for value in values:
    ema = optim.update_ema(ema, {'w': value}, {'m': 2 * value}, decay)
  n = len(values)
  closed = lambda start, xs: decay**n * start + sum((1 - decay) * decay ** (n - 1 - t) * x for t, x in enumerate(xs))
  np.testing.assert_allclose(ema['params']['w'], closed(0.0, values), rtol=1e-6)
  np.testing.assert_allclose(ema['batch_stats']['m'], closed(1.0, [2 * v for v in values]), rtol=1e-6)


def config_with(**optim):
  config = smoke.get_config()
  config.num_epochs, config.optim.warmup_epochs, config.optim.learning_rate = 10.0, 1.0, 0.5
  config.optim.update(optim)
  return config


def schedule(config, steps_per_epoch: int = 10):
  return optim.create_learning_rate_fn(config.optim, Steps.of(config, steps_per_epoch * config.batch_size))


def test_cosine_schedule_warms_up_linearly_then_decays_to_zero():
  fn = schedule(config_with(schedule='cosine'))
  assert fn(0) == 0 and np.isclose(fn(5), 0.25) and np.isclose(fn(10), 0.5)
  assert np.isclose(fn(55), 0.25, atol=1e-6) and np.isclose(fn(100), 0.0, atol=1e-7)


def test_step_schedule_multiplies_by_gamma_at_the_given_epochs():
  fn = schedule(config_with(schedule='step', step_epochs=(4.0, 7.0), step_gamma=0.1))
  assert np.isclose(fn(10), 0.5) and np.isclose(fn(39), 0.5)
  assert np.isclose(fn(40), 0.05) and np.isclose(fn(69), 0.05) and np.isclose(fn(70), 0.005)


def test_onecycle_schedule_decays_linearly_to_zero():
  fn = schedule(config_with(schedule='onecycle'))
  assert np.isclose(fn(10), 0.5) and np.isclose(fn(55), 0.25) and np.isclose(fn(100), 0.0)


PARAMS = {
  'Conv_0': {'kernel': jnp.ones((2, 2))},
  'BatchNorm_0': {'scale': jnp.ones(2), 'bias': jnp.ones(2)},
  'Dense_0': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)},
}


@pytest.mark.parametrize(
  'name, decoupled', [('sgd', False), ('sgd', True), ('sam', False), ('adam', False), ('adamw', False)]
)
def test_weight_decay_shrinks_kernels_only(name, decoupled):
  config = config_with(name=name, weight_decay=0.1, decoupled_weight_decay=decoupled)
  tx = optim.create_optimizer(config.optim, lambda step: 0.1)
  zero_grads = jax.tree.map(jnp.zeros_like, PARAMS)
  updates, _ = tx.update(zero_grads, tx.init(PARAMS), PARAMS)
  new = optax.apply_updates(PARAMS, updates)
  assert np.all(new['Conv_0']['kernel'] < 1) and np.all(new['Dense_0']['kernel'] < 1)
  for leaf in (new['BatchNorm_0']['scale'], new['BatchNorm_0']['bias'], new['Dense_0']['bias']):
    np.testing.assert_array_equal(leaf, 1.0)


def test_decoupled_sgd_weight_decay_stays_out_of_the_momentum():
  grads = jax.tree.map(jnp.zeros_like, PARAMS)
  kernel_after_two_steps = {}
  for decoupled in (False, True):
    tx = optim.create_optimizer(
      config_with(weight_decay=0.1, decoupled_weight_decay=decoupled, nesterov=False).optim, lambda step: 1.0
    )
    params, state = PARAMS, tx.init(PARAMS)
    for _ in range(2):
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
    kernel_after_two_steps[decoupled] = float(params['Conv_0']['kernel'][0, 0])
  # Coupled: the decay enters the momentum (1 - 0.1 - (0.9*0.1 + 0.09)); decoupled: (1 - 0.1)^2.
  assert np.isclose(kernel_after_two_steps[True], 0.81)
  assert np.isclose(kernel_after_two_steps[False], 0.9 - (0.9 * 0.1 + 0.09), atol=1e-6)


def test_label_smoothing_spreads_the_target():
  logits = jnp.array([[2.0, 0.0, -1.0]])
  one_hot = jax.nn.one_hot(jnp.array([0]), 3)
  smoothed = jnp.array([[1 - 0.3 + 0.1, 0.1, 0.1]])
  expected = -jnp.sum(smoothed * jax.nn.log_softmax(logits))
  np.testing.assert_allclose(step.cross_entropy(logits, one_hot, 0.3), [expected], rtol=1e-6)


@pytest.mark.parametrize(
  'override', [{'optim.name': 'sam'}, {'optim.name': 'adamw', 'optim.learning_rate': 3e-3}, {'ema_decay': 0.9}]
)
def test_smoke_trains_with_the_option(tmp_path, override):
  config = smoke.get_config()
  config.num_epochs = 1.0
  for field, value in override.items():
    section, _, name = field.rpartition('.')
    (config[section] if section else config)[name] = value
  metrics = trainer.train_and_evaluate(config, str(tmp_path))
  assert metrics['accuracy'] > 0.2  # 10 classes: above chance after one epoch.
  # --mode=evaluate restores the weights training evaluated (the EMA, with ema_decay), whatever the optimizer.
  report = evaluate.evaluate_checkpoint(config, str(tmp_path))
  assert report['accuracy'] == pytest.approx(metrics['accuracy'], abs=1e-6)
  assert report['loss'] == pytest.approx(metrics['loss'], rel=1e-5)


def test_frozen_batch_norm_scales_and_faster_biases():
  config = config_with(bn_scale_frozen=True, bn_bias_lr_multiplier=10.0, weight_decay=0.0, momentum=0.0)
  tx = optim.create_optimizer(config.optim, lambda step: 0.1)
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  new = optax.apply_updates(PARAMS, tx.update(grads, tx.init(PARAMS), PARAMS)[0])
  np.testing.assert_array_equal(new['BatchNorm_0']['scale'], 1.0)
  np.testing.assert_allclose(new['BatchNorm_0']['bias'], 1.0 - 1.0)  # lr 0.1 x 10.
  np.testing.assert_allclose(new['Dense_0']['bias'], 0.9)
  np.testing.assert_allclose(new['Conv_0']['kernel'], 0.9)


def test_optimizer_names_come_from_the_registry(monkeypatch):
  config = smoke.get_config()
  config.optim.name = 'rmsprop'
  with pytest.raises(ConfigError, match=r"optim.name='rmsprop' is invalid: choose one of sgd, sam, adam, adamw, muon$"):
    config_checks.validate(config)
  rmsprop = optim.Optimizer(lambda optim_config, hparams, learning_rate_fn: optax.rmsprop(learning_rate_fn), options=())
  monkeypatch.setitem(optim.OPTIMIZERS, 'rmsprop', rmsprop)
  config_checks.validate(config)  # Registered: valid, with no other change.
  tx = optim.create_optimizer(config.optim, lambda step: 0.1)
  assert 'ScaleByRmsState' in repr(tx.init(PARAMS))  # optax's rmsprop state, in the trained groups.
  config.optim.schedule = 'linear'
  with pytest.raises(ConfigError, match=r"optim.schedule='linear' is invalid: choose one of cosine, onecycle, step$"):
    config_checks.validate(config)


@pytest.mark.parametrize(
  'name, option, value',
  [('adam', 'decoupled_weight_decay', True), ('adamw', 'momentum', 0.8), ('sgd', 'b2', 0.99), ('sgd', 'sam_rho', 0.1)],
)
def test_an_option_the_optimizer_ignores_is_refused(name, option, value):
  config = smoke.get_config()
  config.optim.name, config.optim[option] = name, value
  with pytest.raises(ConfigError, match=rf'optim.{option}=.* does not apply to optim.name=.{name}.'):
    config_checks.validate(config)
  config.optim[option] = optim.OPTION_DEFAULTS[option]
  config_checks.validate(config)


def test_option_defaults_are_the_default_config():
  defaults = default.get_config().optim
  assert {name: defaults[name] for name in optim.OPTION_DEFAULTS} == optim.OPTION_DEFAULTS
  used = {option for entry in optim.OPTIMIZERS.values() for option in entry.options}
  assert used == set(optim.OPTION_DEFAULTS)


@pytest.mark.parametrize('name', ['resnet18', 'resnet26', 'resnet34', 'resnet50'])
def test_preset_configs_hold_the_recipe_their_docstring_names(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  recipe = {
    'model.name': name,
    'num_epochs': 200.0,
    'batch_size': 512,
    'optim.name': 'sgd',
    'optim.momentum': 0.9,
    'optim.nesterov': True,
    'optim.learning_rate': 0.1,
    'optim.warmup_epochs': 2.0,
    'optim.schedule': 'cosine',
    'optim.weight_decay': 5e-4,
    'augment.train_ops': ('crop', 'flip'),
    'augment.crop_padding': 4,
    'augment.pad_mode': 'reflect',
  }
  assert {field: functools.reduce(getattr, field.split('.'), config) for field in recipe} == recipe
  config_checks.validate(config)


def test_the_train_step_mixes_with_the_configs_mix_prob(monkeypatch):
  """The step passes augment.mix_prob to `mixing.mix_batch` (whose `prob` test_mixing.py checks); traced only."""
  seen = []
  mix_batch = mixing.mix_batch
  monkeypatch.setattr(
    mixing, 'mix_batch', lambda *args, **kwargs: seen.append(kwargs['prob']) or mix_batch(*args, **kwargs)
  )
  config = smoke.get_config()
  config.augment.mixup_alpha, config.augment.mix_prob = 1.0, 0.3
  model = models.create_model_from_config(config, 10)
  spec = step.create_spec(config, model, Steps.of(config, 10 * config.batch_size), (0.5,) * 3, (0.25,) * 3, 10)
  hparams = hyperparams.of(config)
  state = step.create_train_state(models.init_variables(model, (8, 8, 3)), spec.optimizer(hparams))
  batch = {'image': jnp.zeros((8, 8, 8, 3), jnp.uint8), 'label': jnp.zeros(8, jnp.int32), 'index': jnp.arange(8)}
  jax.eval_shape(functools.partial(step.train_step, spec=spec), state, batch, hparams, {})
  assert seen == [0.3]


def test_every_model_option_of_the_config_reaches_the_model():
  config = smoke.get_config()
  config.model.block_dropout_rate, config.model.drop_path_rate = 0.3, 0.1
  model = models.create_model_from_config(config, 10)
  assert (model.block_dropout_rate, model.drop_path_rate, model.num_classes) == (0.3, 0.1, 10)
  config.model.name = 'densenet_bc100_k12'
  with pytest.raises(ValueError, match='has no option block_dropout_rate, drop_path_rate'):
    models.create_model_from_config(config, 10)
