"""Model family: exact parameter counts, the 5M budget, dtypes and options."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_flax import models

BUDGET = 5_000_000


@pytest.mark.parametrize('name, expected', [('resnet18', 2_797_610), ('resnet34', 4_348_082)])
def test_source_project_parameter_counts_are_exact(name, expected):
  assert models.preset_param_count(name) == expected


@pytest.mark.parametrize('name', [n for n in models.PRESETS if n != 'resnet18_imagenet_stem'])
def test_every_preset_fits_the_budget(name):
  assert models.preset_param_count(name) <= BUDGET


def test_imagenet_stem_preset_exceeds_the_budget():
  assert models.preset_param_count('resnet18_imagenet_stem') > BUDGET


def test_cli_prints_every_preset_with_thousands_separators():
  out = subprocess.run([sys.executable, '-m', 'resnet_flax.models'], capture_output=True, text=True,
                       check=True).stdout
  lines = dict(line.split() for line in out.strip().splitlines())
  assert set(lines) == set(models.PRESETS)
  assert lines['resnet18'] == '2,797,610' and lines['resnet34'] == '4,348,082'


def _apply(model, train=False, **kwargs):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), jnp.float32)
  variables = models.init_variables(model, (32, 32, 3), jax.random.key(0))
  if train:
    return model.apply(variables, x, train=True, mutable=['batch_stats'], **kwargs)
  return model.apply(variables, x, train=False), variables


def test_bfloat16_compute_keeps_float32_params_and_returns_float32_logits():
  model = models.create_model('resnet_tiny', 10, dtype=jnp.bfloat16)
  logits, variables = _apply(model)
  assert logits.dtype == jnp.float32 and logits.shape == (4, 10)
  assert {x.dtype for x in jax.tree.leaves(variables['params'])} == {jnp.dtype(jnp.float32)}
  intermediates = model.apply(variables, jnp.zeros((1, 32, 32, 3)), train=False,
                              capture_intermediates=True, mutable=['intermediates'])[1]
  conv_out = intermediates['intermediates']['stem_conv']['__call__'][0]
  assert conv_out.dtype == jnp.bfloat16


def test_zero_init_residual_zeroes_each_blocks_last_bn_scale():
  variables = models.init_variables(models.create_model('resnet_tiny', 10, zero_init_residual=True),
                                    (32, 32, 3), jax.random.key(0))
  for block in ('ResNetBlock_0', 'ResNetBlock_1', 'ResNetBlock_2'):
    assert not np.any(variables['params'][block]['BatchNorm_1']['scale'])
    assert np.all(variables['params'][block]['BatchNorm_0']['scale'] == 1)


def test_squeeze_excitation_adds_gates_to_every_block():
  plain = models.count_params(models.init_variables(models.create_model('resnet_tiny', 10), (32, 32, 3))['params'])
  se = models.init_variables(models.create_model('resnet_tiny', 10, se_ratio=0.25), (32, 32, 3))['params']
  assert all('SqueezeExcite_0' in se[b] for b in ('ResNetBlock_0', 'ResNetBlock_1', 'ResNetBlock_2'))
  assert models.count_params(se) > plain


def test_dropout_is_random_in_training_and_off_in_evaluation():
  model = models.create_model('resnet_tiny', 10, dropout_rate=0.5)
  a, _ = _apply(model, train=True, rngs={'dropout': jax.random.key(1)})
  b, _ = _apply(model, train=True, rngs={'dropout': jax.random.key(2)})
  assert not np.allclose(a, b)
  assert np.array_equal(_apply(model)[0], _apply(model)[0])


def test_imagenet_stem_downsamples_by_four_before_the_first_stage():
  model = models.create_model('resnet18_imagenet_stem', 10)
  variables = models.init_variables(model, (64, 64, 3), jax.random.key(0))
  _, state = model.apply(variables, jnp.zeros((1, 64, 64, 3)), train=False, capture_intermediates=True,
                         mutable=['intermediates'])
  assert state['intermediates']['ResNetBlock_0']['__call__'][0].shape == (1, 16, 16, 64)


def test_bottleneck_blocks_expand_channels_four_times():
  model = models.create_model('resnet50', 10)
  variables = models.init_variables(model, (32, 32, 3), jax.random.key(0))
  _, state = model.apply(variables, jnp.zeros((1, 32, 32, 3)), train=False, capture_intermediates=True,
                         mutable=['intermediates'])
  assert state['intermediates']['BottleneckResNetBlock_15']['__call__'][0].shape[-1] == 4 * 192


def test_unknown_preset_is_a_clear_error():
  with pytest.raises(ValueError, match='unknown model.name'):
    models.create_model('resnet999', 10)
