"""airbench's speed tricks as options: a frozen patch-whitening stem, dirac init, alternating flip."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default, fast, smoke
from resnet_flax import models, optim
from resnet_flax.data import ImageData, augment
from resnet_flax.errors import ConfigError
from resnet_flax.models import layers
from resnet_flax.train import config_checks, trainer


def _correlated_images(n: int = 256, size: int = 8, seed: int = 0) -> np.ndarray:
  """Normalized-looking float images whose neighbouring pixels and channels are strongly correlated."""
  rng = np.random.default_rng(seed)
  noise = rng.normal(size=(n, size + 1, size + 1, 1))
  smooth = noise[:, 1:, 1:] + noise[:, :-1, 1:] + noise[:, 1:, :-1]
  return (smooth * np.array([1.0, 0.8, 0.5]) + 0.3 * rng.normal(size=(n, size, size, 3))).astype(np.float32)


def _whiten(images: np.ndarray, kernel: jax.Array) -> np.ndarray:
  return np.asarray(layers.PatchWhitening().apply({'params': {'kernel': kernel}}, jnp.asarray(images)))


def test_whitening_kernel_makes_the_patch_covariance_the_identity():
  images = _correlated_images()
  kernel = layers.whitening_kernel(images, patch_size=2, eps=1e-8)
  assert kernel.shape == (2, 2, 3, 24)
  out = _whiten(images, kernel).reshape(-1, 24)
  positive, negative = out[:, :12], out[:, 12:]
  np.testing.assert_allclose(positive.T @ positive / len(positive), np.eye(12), atol=2e-3)
  np.testing.assert_array_equal(negative, -positive)
  raw = images[:, :2, :2].reshape(len(images), -1)  # The patches before whitening are far from white.
  assert np.abs(np.corrcoef(raw.T) - np.eye(12)).max() > 0.5


def test_whitening_stem_is_frozen_against_gradients_and_weight_decay():
  config = default.get_config()
  config.model.name, config.model.stem = 'resnet_tiny', 'whiten'
  model = models.create_model_from_config(config, 10)
  images = _correlated_images(n=16)
  variables = models.init_variables(model, images.shape[1:], jax.random.key(0))
  kernel = layers.whitening_kernel(images)
  variables = {**variables, 'params': {**variables['params'], layers.WHITENING: {'kernel': kernel}}}

  def loss(params):
    logits, _ = model.apply({**variables, 'params': params}, images, mutable=['batch_stats'])
    return logits.sum()

  grads = jax.grad(loss)(variables['params'])
  np.testing.assert_array_equal(grads[layers.WHITENING]['kernel'], 0.0)
  tx = optim.create_optimizer(config.optim, lambda step: 0.1)
  ones = jax.tree.map(jnp.ones_like, variables['params'])  # A gradient that would move every parameter.
  updates, _ = tx.update(ones, tx.init(variables['params']), variables['params'])
  new = optax.apply_updates(variables['params'], updates)
  np.testing.assert_array_equal(new[layers.WHITENING]['kernel'], kernel)
  assert not np.allclose(new['stem_conv']['kernel'], variables['params']['stem_conv']['kernel'])


def test_initial_variables_set_the_whitening_stem_from_the_normalized_training_images():
  config = default.get_config()
  config.model.name, config.model.stem = 'resnet_tiny', 'whiten'
  images = np.random.default_rng(0).integers(0, 256, (64, 8, 8, 3), dtype=np.uint8)
  split = ImageData(images, np.zeros(len(images), np.int32), tuple(f'c{i}' for i in range(10)))
  mean, std = augment.channel_stats(images)
  model = models.create_model_from_config(config, 10)
  assert not np.any(
    models.init_variables(model, images.shape[1:], jax.random.key(0))['params'][layers.WHITENING]['kernel']
  )
  variables = trainer.initial_variables(config, model, split, mean, std)
  expected = layers.whitening_kernel(augment.normalize(images, mean, std))
  np.testing.assert_allclose(variables['params'][layers.WHITENING]['kernel'], expected, rtol=1e-5, atol=1e-6)
  config.model.stem = ''
  plain = trainer.initial_variables(config, models.create_model_from_config(config, 10), split, mean, std)
  assert layers.WHITENING not in plain['params']


@pytest.mark.parametrize('in_channels, out_channels, strides', [(4, 6, 1), (6, 4, 1), (4, 8, 2)])
def test_dirac_init_passes_the_first_channels_through(in_channels, out_channels, strides):
  conv = nn.Conv(out_channels, (3, 3), strides, use_bias=False, kernel_init=layers.dirac())
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, in_channels))
  y, params = conv.init_with_output(jax.random.key(0), x)
  passed = min(in_channels, out_channels)
  centres = slice(strides - 1, None, strides)  # SAME pads a stride-2 window on 8 pixels by 0 before, 1 after.
  np.testing.assert_allclose(y[..., :passed], x[:, centres, centres, :passed], atol=1e-6)
  if out_channels > in_channels:  # The other filters keep the base init.
    assert np.std(params['params']['kernel'][..., passed:]) > 0.05


def test_dirac_init_reaches_every_resnet_conv():
  model = models.create_model('resnet_tiny', 10, dirac_init=True)
  params = models.init_variables(model, (8, 8, 3), jax.random.key(0))['params']
  kernel = params['ResNetBlock_0']['Conv_0']['kernel']  # 16 -> 16 channels.
  np.testing.assert_array_equal(kernel[1, 1], np.eye(16))
  np.testing.assert_array_equal(kernel[0], 0.0)


def _alternating_flip(images, indices, epoch: int, seed: int) -> np.ndarray:
  """The uint8 pixels of the alternating_flip op alone, through augment_batch."""
  config = default.get_config().augment
  config.train_ops = ('alternating_flip',)
  context = {'indices': indices, 'epoch': jnp.array(epoch), 'seed': seed}
  out = augment.augment_batch(images, jax.random.key(0), config, (0.0,), (1.0,), **context)
  return np.rint(np.asarray(out) * 255).astype(np.uint8)


def test_alternating_flip_shows_each_image_both_ways_every_two_epochs():
  num = 4000
  images = np.zeros((num, 1, 2, 1), np.uint8)
  images[:, 0, 1] = 1  # Mirrored, the 1 moves to column 0.
  indices = jnp.arange(num)
  flipped = [_alternating_flip(images, indices, epoch, seed=3)[:, 0, 0, 0] == 1 for epoch in range(4)]
  assert abs(flipped[0].mean() - 0.5) < 5 * np.sqrt(0.25 / num)
  np.testing.assert_array_equal(flipped[1], ~flipped[0])
  np.testing.assert_array_equal(flipped[2], flipped[0])
  np.testing.assert_array_equal(flipped[3], flipped[1])
  other_seed = _alternating_flip(images, indices, 0, seed=4)[:, 0, 0, 0] == 1
  assert 0.4 < np.mean(other_seed == flipped[0]) < 0.6
  # It follows the example, not its place in the batch.
  shuffled = np.random.default_rng(0).permutation(num)
  again = _alternating_flip(images[shuffled], indices[shuffled], 0, seed=3)
  np.testing.assert_array_equal(again[:, 0, 0, 0] == 1, flipped[0][shuffled])


def test_alternating_flip_with_the_flip_op_is_a_config_error():
  config = default.get_config()
  config.augment.alternating_flip = True
  with pytest.raises(ConfigError, match="replaces the 'flip' op"):
    config_checks.validate(config)
  config.augment.train_ops = ('crop',)
  config_checks.validate(config)


def test_fast_config_uses_the_airbench_tricks_within_budget():
  config = fast.get_config()
  config_checks.validate(config)
  assert config.model.stem == 'whiten' and config.model.dirac_init and config.augment.alternating_flip
  assert config.data.pipeline == 'device' and config.half_precision and config.ema_decay > 0
  assert config.optim.bn_scale_frozen and config.optim.bn_bias_lr_multiplier > 1 and config.optim.label_smoothing
  variables = models.init_variables(models.create_model_from_config(config, 10), (32, 32, 3))
  assert models.count_params(variables['params']) <= config.model.max_params


def test_smoke_trains_with_the_airbench_options(tmp_path):
  config = smoke.get_config()
  config.num_epochs = 1.0
  config.model.stem, config.model.dirac_init = 'whiten', True
  config.augment.train_ops, config.augment.alternating_flip = ('crop',), True
  config.optim.bn_scale_frozen, config.optim.bn_bias_lr_multiplier = True, 4.0
  metrics = trainer.train_and_evaluate(config, str(tmp_path))
  assert metrics['accuracy'] > 0.2  # 10 classes: above chance after one epoch.
