"""Model family: exact parameter counts, the 5M budget, dtypes and options."""

import functools
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_flax import models

BUDGET = 5_000_000
# The presets of issue 6 ("Training recipes"). Published counts, in millions as printed: WRN-16-4 2.7 and
# WRN-40-2 2.2 (Zagoruyko & Komodakis 2016), WRN-28-2 1.5 (Oliver et al. 2018), WRN-22-4 4.3 (as commonly
# quoted), DenseNet-BC L=100 k=12 0.8 (Huang et al. 2017).
NEW_PRESET_COUNTS = {
  'se_resnet18': 2_885_850,
  'preact_resnet18': 2_796_714,
  'wrn16_4': 2_748_890,
  'wrn22_4': 4_298_970,
  'wrn28_2': 1_467_610,
  'wrn40_2': 2_243_546,
  'se_wrn16_4': 2_836_026,
  'densenet_bc100_k12': 769_162,
  'densenet_bc100_k24': 3_020_506,
}
PUBLISHED_MILLIONS = {'wrn16_4': 2.7, 'wrn22_4': 4.3, 'wrn28_2': 1.5, 'wrn40_2': 2.2, 'densenet_bc100_k12': 0.8}
TRAIN_PY_KWARGS = dict(dtype=jnp.float32, dropout_rate=0.0, se_ratio=0.0, zero_init_residual=False)

param_count = functools.cache(models.preset_param_count)


def _key(seed: int = 0) -> jax.Array:
  """A PRNG key; XLA:CPU takes seconds to compile threefry random bits, 'rbg' ones a fraction of that."""
  return jax.random.key(seed, impl='rbg')


def _compile(fun):
  """jax.jit without XLA's backend optimisations: quicker for graphs that run once, on CPU, than op by op."""
  return jax.jit(fun, compiler_options={'xla_backend_optimization_level': 0})


def _init(model: nn.Module, image_shape=(32, 32, 3)):
  return _compile(functools.partial(model.init, train=False))(_key(), jnp.zeros((1, *image_shape)))


def _images(batch: int, size: int = 32) -> jax.Array:
  return jnp.asarray(np.random.default_rng(0).normal(size=(batch, size, size, 3)), jnp.float32)


@functools.cache
def _compiled_apply(model, train: bool, capture: bool):
  mutable = ['batch_stats'] * train + ['intermediates'] * capture
  return _compile(functools.partial(model.apply, train=train, mutable=mutable, capture_intermediates=capture))


def _apply(model, variables, x, train=False, capture=False, seed=0):
  """`model.apply`, compiled; returns (logits, {'batch_stats' in training, 'intermediates' if `capture`})."""
  return _compiled_apply(model, train, capture)(variables, x, rngs={'dropout': _key(seed)})


def _abstract_intermediates(model, image_shape):
  """Every module's output shape for one image (nothing is computed)."""
  apply = functools.partial(model.apply, train=False, capture_intermediates=True, mutable=['intermediates'])
  return jax.eval_shape(apply, models.init_variables(model, image_shape), jnp.zeros((1, *image_shape)))[1][
    'intermediates'
  ]


@functools.cache
def _tiny_variables():
  """resnet_tiny's initial variables, made once: dropout and its other options keep their shapes."""
  return _init(models.create_model('resnet_tiny', 10))


def _small_preact_resnet(**kwargs) -> models.ResNet:
  return models.ResNet(stage_sizes=(1, 1), block_cls=models.PreActBlock, widths=(8, 16), num_classes=10, **kwargs)


@pytest.mark.parametrize('name, expected', [('resnet18', 2_797_610), ('resnet34', 4_348_082)])
def test_source_project_parameter_counts_are_exact(name, expected):
  assert param_count(name) == expected


@pytest.mark.parametrize('name, expected', NEW_PRESET_COUNTS.items())
def test_new_preset_parameter_counts_are_exact(name, expected):
  assert param_count(name) == expected


@pytest.mark.parametrize('name, millions', PUBLISHED_MILLIONS.items())
def test_counts_match_the_papers(name, millions):
  assert round(param_count(name) / 1e6, 1) == millions


@pytest.mark.parametrize('name', [n for n in models.PRESETS if n != 'resnet18_imagenet_stem'])
def test_every_preset_fits_the_budget(name):
  assert param_count(name) <= BUDGET


def test_imagenet_stem_preset_exceeds_the_budget():
  assert param_count('resnet18_imagenet_stem') > BUDGET


def test_cli_prints_every_preset_with_thousands_separators():
  out = subprocess.run([sys.executable, '-m', 'resnet_flax.models'], capture_output=True, text=True, check=True).stdout
  lines = dict(line.split() for line in out.strip().splitlines())
  assert set(lines) == set(models.PRESETS)
  assert lines['resnet18'] == '2,797,610' and lines['resnet34'] == '4,348,082'


def test_bfloat16_compute_keeps_float32_params_and_returns_float32_logits():
  model = models.create_model('resnet_tiny', 10, dtype=jnp.bfloat16)
  variables = _init(model)
  logits, state = _apply(model, variables, _images(4), capture=True)
  assert logits.dtype == jnp.float32 and logits.shape == (4, 10)
  assert {x.dtype for x in jax.tree.leaves(variables['params'])} == {jnp.dtype(jnp.float32)}
  assert state['intermediates']['stem_conv']['__call__'][0].dtype == jnp.bfloat16


def test_zero_init_residual_zeroes_each_blocks_last_bn_scale():
  variables = _init(models.create_model('resnet_tiny', 10, zero_init_residual=True))
  for block in ('ResNetBlock_0', 'ResNetBlock_1', 'ResNetBlock_2'):
    assert not np.any(variables['params'][block]['BatchNorm_1']['scale'])
    assert np.all(variables['params'][block]['BatchNorm_0']['scale'] == 1)


def test_squeeze_excitation_adds_gates_to_every_block():
  plain = models.count_params(models.init_variables(models.create_model('resnet_tiny', 10), (32, 32, 3))['params'])
  se = models.init_variables(models.create_model('resnet_tiny', 10, se_ratio=0.25), (32, 32, 3))['params']
  assert all('SqueezeExcite_0' in se[b] for b in ('ResNetBlock_0', 'ResNetBlock_1', 'ResNetBlock_2'))
  assert models.count_params(se) > plain


@pytest.mark.parametrize('option', ['dropout_rate', 'block_dropout_rate', 'drop_path_rate'])
def test_dropouts_are_random_in_training_and_off_in_evaluation(option):
  model = models.create_model('resnet_tiny', 10, **{option: 0.5})
  x = _images(4)
  a, _ = _apply(model, _tiny_variables(), x, train=True, seed=1)
  b, _ = _apply(model, _tiny_variables(), x, train=True, seed=2)
  assert not np.allclose(a, b)
  plain = models.create_model('resnet_tiny', 10)
  assert np.array_equal(_apply(model, _tiny_variables(), x)[0], _apply(plain, _tiny_variables(), x)[0])


def test_imagenet_stem_downsamples_by_four_before_the_first_stage():
  out = _abstract_intermediates(models.create_model('resnet18_imagenet_stem', 10), (64, 64, 3))
  assert out['ResNetBlock_0']['__call__'][0].shape == (1, 16, 16, 64)


def test_bottleneck_blocks_expand_channels_four_times():
  out = _abstract_intermediates(models.create_model('resnet50', 10), (32, 32, 3))
  assert out['BottleneckResNetBlock_15']['__call__'][0].shape[-1] == 4 * 192


def test_unknown_preset_is_a_clear_error():
  with pytest.raises(ValueError, match='unknown model.name'):
    models.create_model('resnet999', 10)


def test_preactivation_block_normalises_its_input_and_adds_a_conv_output():
  model = _small_preact_resnet()
  variables = _init(model, (8, 8, 3))
  logits, state = _apply(model, variables, _images(2, 8), capture=True)
  out = state['intermediates']
  block_in, block = out['stem_conv']['__call__'][0], out['PreActBlock_0']
  # The stem is a bare conv; the block's first op is BN of its input (a fresh BN's running stats: 0, 1).
  np.testing.assert_allclose(
    block['BatchNorm_0']['__call__'][0], block_in / np.sqrt(1 + models.BATCH_NORM_EPSILON), rtol=1e-5, atol=1e-6
  )
  # An identity shortcut: what the block adds to its input is its last conv's output.
  np.testing.assert_allclose(block['__call__'][0] - block_in, block['Conv_1']['__call__'][0], rtol=1e-5, atol=1e-5)
  # A final BN-ReLU precedes the pooling and the classifier.
  features = jnp.mean(jax.nn.relu(out['final_norm']['__call__'][0]), axis=(1, 2))
  dense = variables['params']['Dense_0']
  np.testing.assert_allclose(logits, features @ dense['kernel'] + dense['bias'], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  'name, depth, k', [('wrn16_4', 16, 4), ('wrn22_4', 22, 4), ('wrn28_2', 28, 2), ('wrn40_2', 40, 2)]
)
def test_wide_resnet_has_d_minus_4_over_6_blocks_per_stage_of_widths_16k_32k_64k(name, depth, k):
  params = models.init_variables(models.create_model(name, 10), (32, 32, 3))['params']
  n = (depth - 4) // 6
  assert params['stem_conv']['kernel'].shape == (3, 3, 3, 16)
  blocks = [params[f'PreActBlock_{i}'] for i in range(3 * n)]
  assert f'PreActBlock_{3 * n}' not in params and 'final_norm' in params
  assert [b['Conv_1']['kernel'].shape[-1] for b in blocks] == [16 * k] * n + [32 * k] * n + [64 * k] * n
  assert [i for i, b in enumerate(blocks) if 'shortcut_conv' in b] == [0, n, 2 * n]


@pytest.mark.parametrize('name, depth, k', [('densenet_bc100_k12', 100, 12), ('densenet_bc100_k24', 100, 24)])
def test_dense_blocks_add_n_times_k_channels_and_transitions_halve_channels_and_size(name, depth, k):
  out = _abstract_intermediates(models.create_model(name, 10), (32, 32, 3))
  n, channels, size = (depth - 4) // 6, 2 * k, 32
  assert out['stem_conv']['__call__'][0].shape == (1, size, size, channels)
  for block in range(3):
    channels += n * k
    assert out[f'DenseBlock_{block}']['__call__'][0].shape == (1, size, size, channels)
    if block < 2:
      channels, size = channels // 2, size // 2
      assert out[f'Transition_{block}']['__call__'][0].shape == (1, size, size, channels)


def test_se_presets_keep_their_gates_when_train_py_passes_se_ratio_zero():
  model = models.create_model('se_wrn16_4', 10, **TRAIN_PY_KWARGS)
  params = models.init_variables(model, (32, 32, 3))['params']
  assert all('SqueezeExcite_0' in params[f'PreActBlock_{i}'] for i in range(6))
  assert models.count_params(params) == NEW_PRESET_COUNTS['se_wrn16_4']


def test_densenet_accepts_absent_options_switched_off_and_refuses_them_switched_on():
  models.create_model('densenet_bc100_k12', 10, drop_path_rate=0.0, block_dropout_rate=0.0, **TRAIN_PY_KWARGS)
  for option, value in [('se_ratio', 0.25), ('zero_init_residual', True), ('drop_path_rate', 0.1)]:
    with pytest.raises(ValueError, match=f'has no option {option}'):
      models.create_model('densenet_bc100_k12', 10, **{**TRAIN_PY_KWARGS, option: value})


def test_zero_init_residual_zeroes_each_preactivation_blocks_last_conv():
  params = _init(_small_preact_resnet(zero_init_residual=True), (8, 8, 3))['params']
  for block in ('PreActBlock_0', 'PreActBlock_1'):
    assert not np.any(params[block]['Conv_1']['kernel']) and np.any(params[block]['Conv_0']['kernel'])


def _drop_path_rates(model) -> list[float]:
  """The stochastic-depth rate of every block, in call order (from a trace: nothing is computed)."""
  rates = []

  def record(next_fun, args, kwargs, context):
    if context.module.name == 'drop_path':
      rates.append(context.module.rate)
    return next_fun(*args, **kwargs)

  apply = functools.partial(model.apply, train=True, mutable=['batch_stats'], rngs={'dropout': _key()})
  variables = models.init_variables(model, (32, 32, 3))
  with nn.intercept_methods(record):
    jax.eval_shape(apply, variables, jnp.zeros((1, 32, 32, 3)))
  return rates


@pytest.mark.parametrize('name', ['resnet18', 'resnet50', 'preact_resnet18', 'wrn16_4'])
def test_drop_path_rate_grows_linearly_to_the_last_block(name):
  model = models.create_model(name, 10, drop_path_rate=0.2)
  rates = _drop_path_rates(model)
  assert len(rates) == sum(model.stage_sizes)
  np.testing.assert_allclose(rates, 0.2 * np.arange(1, len(rates) + 1) / len(rates))


@pytest.mark.parametrize('block_cls', [models.ResNetBlock, models.PreActBlock])
def test_stochastic_depth_makes_a_block_the_identity_for_the_examples_it_drops(block_cls):
  model = models.ResNet(stage_sizes=(2,), block_cls=block_cls, widths=(8,), num_classes=10, drop_path_rate=0.9)
  x = _images(32, 8)
  out = _apply(model, _init(model, (8, 8, 3)), x, train=True, capture=True)[1]['intermediates']
  name = block_cls.__name__
  last_block_in, last_block_out = out[f'{name}_0']['__call__'][0], out[f'{name}_1']['__call__'][0]
  dropped = np.all(last_block_out == last_block_in, axis=(1, 2, 3))
  assert 0 < dropped.sum() < len(x)  # The last block's rate is 0.9, drawn per example.


def _loss_and_grads(model, variables, x):
  def loss(params, batch_stats):
    logits, _ = model.apply(
      {'params': params, 'batch_stats': batch_stats}, x, train=True, mutable=['batch_stats'], rngs={'dropout': _key()}
    )
    return jnp.mean(logits**2), logits

  return jax.value_and_grad(loss, has_aux=True)(variables['params'], variables['batch_stats'])


def _assert_float32_logits_params_and_grads(variables, logits, grads):
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert jax.tree.structure(grads) == jax.tree.structure(variables['params'])
  assert {x.dtype for x in jax.tree.leaves((variables['params'], grads))} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize('name', NEW_PRESET_COUNTS)
def test_every_new_preset_traces_forward_and_backward_in_bfloat16(name):
  model = models.create_model(name, 10, **{**TRAIN_PY_KWARGS, 'dtype': jnp.bfloat16})
  variables = models.init_variables(model, (32, 32, 3))
  (_, logits), grads = jax.eval_shape(functools.partial(_loss_and_grads, model), variables, jnp.zeros((2, 32, 32, 3)))
  _assert_float32_logits_params_and_grads(variables, logits, grads)


@pytest.mark.parametrize(
  'model',
  [
    _small_preact_resnet(se_ratio=0.25, block_dropout_rate=0.3, drop_path_rate=0.2, dtype=jnp.bfloat16),
    models.DenseNet(depth=10, growth_rate=4, num_classes=10, dtype=jnp.bfloat16),
  ],
  ids=['preact', 'densenet'],
)
def test_small_new_architectures_train_in_bfloat16_with_finite_gradients(model):
  variables = _init(model)
  (loss, logits), grads = _compile(functools.partial(_loss_and_grads, model))(variables, _images(2))
  _assert_float32_logits_params_and_grads(variables, logits, grads)
  assert np.isfinite(loss) and all(np.all(np.isfinite(g)) and np.any(g) for g in jax.tree.leaves(grads))
