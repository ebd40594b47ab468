"""optim.name=muon: Muon's orthogonalised updates on the hidden conv kernels, SGD-Nesterov on the rest."""

import flax
import jax
import numpy as np
import optax
import pytest

from configs import smoke
from resnet_flax import models, optim
from resnet_flax.errors import ConfigError
from resnet_flax.train import config_checks

LEARNING_RATE = 0.1


def muon_config(**optim_fields):
  config = smoke.get_config()
  config.optim.name, config.optim.weight_decay = 'muon', 0.0
  config.optim.update(optim_fields)
  return config


@pytest.fixture(scope='module')
def one_update():
  """(parameters, gradients, Muon's first update, SGD-Nesterov's first update) of resnet_tiny, flattened."""
  config = muon_config()
  params = models.init_variables(models.create_model_from_config(config, 10), (32, 32, 3), jax.random.key(0))['params']
  keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
  grads = jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape) * np.linspace(0.1, 3, p.shape[-1]), params)
  update = lambda tx: tx.update(grads, tx.init(params), params)[0]
  muon = update(optim.create_optimizer(config.optim, lambda step: LEARNING_RATE))
  sgd = update(optax.sgd(LEARNING_RATE, momentum=config.optim.momentum, nesterov=True))
  flat = lambda tree: flax.traverse_util.flatten_dict(tree, sep='/')
  return flat(params), flat(grads), flat(muon), flat(sgd)


def singular_value_spread(kernel: np.ndarray) -> float:
  values = np.linalg.svd(np.asarray(kernel).reshape(-1, kernel.shape[-1]), compute_uv=False)
  return float(values.max() / values.min())


def test_hidden_conv_kernels_get_orthogonalised_updates(one_update):
  params, grads, muon, _ = one_update
  hidden = [path for path, p in params.items() if p.ndim == 4 and not path.startswith(models.STEM)]
  assert len(hidden) == 8  # resnet_tiny's block and shortcut convolutions.
  for path in hidden:
    assert singular_value_spread(grads[path]) > 10  # The gradients' spectra are far from flat...
    assert singular_value_spread(muon[path]) < 1.8, path  # ...the updates' near-equal (Newton-Schulz: 0.7 to 1.2).


def test_the_stem_batch_norm_biases_and_classifier_get_plain_sgd_nesterov(one_update):
  params, _, muon, sgd = one_update
  rest = [path for path, p in params.items() if p.ndim != 4 or path.startswith(models.STEM)]
  assert {'stem_conv/kernel', 'Dense_0/kernel', 'Dense_0/bias', 'stem_norm/scale'} <= set(rest)
  for path in rest:
    np.testing.assert_allclose(muon[path], sgd[path], rtol=1e-6, err_msg=path)


def test_muon_is_registered_and_refuses_options_it_ignores():
  config_checks.validate(muon_config())
  with pytest.raises(ConfigError, match=r'optim.b1=0.8 does not apply to .*muon'):
    config_checks.validate(muon_config(b1=0.8))
  config = smoke.get_config()
  config.optim.muon_lr_multiplier = 2.0
  with pytest.raises(ConfigError, match=r'optim.muon_lr_multiplier=2.0 does not apply to .*sgd.*only to muon'):
    config_checks.validate(config)


def test_a_widening_kernel_is_scaled_by_the_root_of_its_fan_out_over_fan_in(one_update):
  params, _, muon, _ = one_update
  shortcut = 'ResNetBlock_1/shortcut_conv/kernel'  # 1x1, 16 -> 32 channels: sqrt(32 / 16).
  assert params[shortcut].shape == (1, 1, 16, 32)
  rms = lambda path: float(np.sqrt(np.mean(np.square(np.asarray(muon[path])))))
  conv = 'ResNetBlock_1/Conv_1/kernel'  # 3x3, 32 -> 32: no scaling; an orthogonal [288, 32] has RMS 1/sqrt(288).
  rate = LEARNING_RATE * optim.OPTION_DEFAULTS['muon_lr_multiplier']
  assert rms(conv) == pytest.approx(rate / np.sqrt(288), rel=0.25)
  assert rms(shortcut) == pytest.approx(rate * np.sqrt(2) / np.sqrt(32), rel=0.25)
