"""AugMix: the op (data/augmix.py, the train op 'augmix') and its Jensen-Shannon consistency loss
(train/consistency.py): ranges, determinism, the op list, the loss against NumPy, the refusals, a smoke run,
and (slow, in test_recipe_resume.py) a bitwise resume after a kill."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import augmix as augmix_recipe
from configs import default, smoke
from resnet_flax import step_extensions
from resnet_flax.data import augment, augmix
from resnet_flax.errors import ConfigError
from resnet_flax.run import writers
from resnet_flax.train import config_checks, consistency, trainer

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
NUM_CLASSES = 5


def pixels(batch: int = 4, size: int = 12, seed: int = 0) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3)), jnp.uint8)


@jax.jit
def augmix_batch(key: jax.Array, images: jax.Array) -> jax.Array:
  """The op with its defaults (the paper's) on each image, compiled: eager, each op would compile on its own."""
  return jax.vmap(augmix.augment_and_mix)(augment.example_keys(key, images.shape[0]), images)


def augmix_config(**fields) -> ml_collections.ConfigDict:
  """The smoke config with the fields `configs/augmix.py` sets; `fields` are dotted config fields."""
  config = augmix_recipe.add_augmix(smoke.get_config())
  config.update_from_flattened_dict(fields)
  return config


# The op.


def test_the_op_keeps_the_shape_and_the_pixel_range_and_returns_float32():
  mixed = augmix_batch(jax.random.key(0), pixels(8))
  assert mixed.shape == (8, 12, 12, 3) and mixed.dtype == jnp.float32
  assert 0 <= float(mixed.min()) and float(mixed.max()) <= 255


def test_the_op_is_a_function_of_its_key_and_differs_between_examples():
  images = jnp.repeat(pixels(1), 4, axis=0)  # Four copies of one image: only their keys differ.
  first, again = augmix_batch(jax.random.key(1), images), augmix_batch(jax.random.key(1), images)
  np.testing.assert_array_equal(first, again)
  assert all(not np.array_equal(first[0], first[i]) for i in (1, 2, 3))
  assert not np.array_equal(first, augmix_batch(jax.random.key(2), images))


def test_the_ops_are_the_papers_without_those_that_overlap_cifar10c():
  assert set(augmix.OPS) == {
    'autocontrast',
    'equalize',
    'posterize',
    'rotate',
    'solarize',
    'shear_x',
    'shear_y',
    'translate_x',
    'translate_y',
  }
  assert set(augmix.EXCLUDED) == {'color', 'contrast', 'brightness', 'sharpness'}
  assert not set(augmix.OPS) & set(augmix.EXCLUDED)


def test_the_paper_levels_at_severity_3():
  """As the paper's augmentations.py: posterize keeps 3 or 4 bits, solarize inverts from a threshold in 180..254."""
  levels = jnp.linspace(augmix.LOWEST_LEVEL, 2.999, 12)
  image = jnp.arange(256, dtype=jnp.uint8).reshape(16, 16, 1).repeat(3, axis=-1)
  no = jnp.asarray(False)
  for level in levels:
    posterized = augmix.OPS['posterize'](image, level, no)
    assert len(np.unique(np.asarray(posterized))) in (8, 16)
    solarized = np.asarray(augmix.OPS['solarize'](image, level, no))[..., 0].ravel()
    first_inverted = int(np.argmax(solarized != np.arange(256)))
    assert 180 <= first_inverted <= 254


def test_augmix_composes_with_crop_and_flip_and_refuses_to_follow_cutout():
  config = default.get_config().augment
  config.train_ops = ('crop', 'flip', 'augmix(width=1, depth=1)')
  batch = augment.augment_batch(pixels(4), jax.random.key(0), config, MEAN, STD, indices=jnp.arange(4), epoch=0, seed=0)
  assert batch.dtype == jnp.float32 and batch.shape == (4, 12, 12, 3)
  config.train_ops = ('crop', 'cutout', 'augmix')
  with pytest.raises(ValueError, match='augmix works on uint8 pixels: put it before cutout'):
    augment.augment_batch(pixels(4), jax.random.key(0), config, MEAN, STD, indices=jnp.arange(4), epoch=0, seed=0)


@pytest.mark.parametrize(
  'op, message',
  [
    ('augmix(width=0)', 'width=0 must be an integer >= 1'),
    ('augmix(depth=0)', 'depth=0 must be -1'),
    ('augmix(severity=11)', 'severity=11 must be a number in 1..10'),
    ('augmix(alpha=0)', 'alpha=0 must be > 0'),
  ],
)
def test_bad_op_arguments_are_refused(op, message):
  config = default.get_config()
  config.augment.train_ops = ('crop', op)
  with pytest.raises(ConfigError, match=message):
    config_checks.validate(config)


# The loss.


def numpy_jsd(logits: list[np.ndarray]) -> float:
  probabilities = [np.exp(x - x.max(-1, keepdims=True)) for x in map(np.float64, logits)]
  probabilities = [p / p.sum(-1, keepdims=True) for p in probabilities]
  log_mixture = np.log(np.clip(sum(probabilities) / len(probabilities), 1e-7, 1))
  return float(np.mean([np.sum(p * (np.log(p) - log_mixture), -1).mean() for p in probabilities]))


def test_jsd_is_zero_for_identical_distributions_and_matches_numpy_otherwise():
  logits = np.random.default_rng(0).normal(size=(3, 6, NUM_CLASSES)).astype(np.float32) * 3
  assert float(consistency.jensen_shannon([jnp.asarray(logits[0])] * 3)) == pytest.approx(0, abs=1e-6)
  jsd = float(consistency.jensen_shannon([jnp.asarray(x) for x in logits]))
  assert jsd > 0.01
  assert jsd == pytest.approx(numpy_jsd(list(logits)), rel=1e-5)


class TinyNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(NUM_CLASSES)(jnp.mean(nn.relu(x), axis=(1, 2)))


@pytest.mark.parametrize('class_weights', [None, np.array([1.0, 2.0, 0.5, 1.0, 3.0], np.float32)])
def test_the_step_loss_is_the_clean_cross_entropy_plus_weight_times_jsd(class_weights):
  """The hooks as the train step folds them: prepare, the step's cross-entropy over the concatenation, loss."""
  from resnet_flax.train.step import cross_entropy  # The plain step's loss (tests are outside the layers).

  config = augmix_config(**{'augment.augmix_width': 2, 'augment.augmix_depth': 1})  # Quicker to compile.
  extension = consistency.AugMixConsistency.create(config, None, None)
  args = jax.tree.map(jnp.asarray, extension.arguments())
  images, labels = pixels(6, 8), jnp.arange(6) % NUM_CLASSES
  clean = augment.normalize(images, MEAN, STD)
  model = TinyNet()
  variables = model.init(jax.random.key(0), clean)
  forward = lambda v, x: model.apply(v, x, mutable=['batch_stats'])
  # `apply` only where StepContext has it (the step of issue 29 adds it).
  fields = {'state': None, 'forward': forward, 'apply': model.apply, 'key': jax.random.key(3), 'mean': MEAN, 'std': STD}
  context = step_extensions.StepContext(
    **{k: v for k, v in fields.items() if k in step_extensions.StepContext.__dataclass_fields__}
  )
  prepare = jax.jit(lambda args, batch: extension.prepare(args, context, batch))
  batch, aux = prepare(args, step_extensions.Batch(clean, jax.nn.one_hot(labels, NUM_CLASSES)))
  assert batch.images.shape == (18, 8, 8, 3)
  np.testing.assert_array_equal(batch.images[:6], clean)
  views = jax.jit(lambda key, images: consistency.augmix_views(key, images, extension.augmix_arguments))(
    jax.random.fold_in(context.key, consistency.VIEWS_STREAM), images
  )
  np.testing.assert_allclose(batch.images[6:12], augment.normalize(views[0], MEAN, STD), rtol=1e-6, atol=1e-6)

  logits, updates = forward(variables, batch.images)  # One forward of all three: BatchNorm sees the mixture.
  plain = cross_entropy(logits, batch.targets, 0.0, class_weights).mean()
  loss = extension.loss(args, context, aux, step_extensions.Loss(plain, logits, variables['params'], updates))
  clean_logits, *view_logits = np.split(np.asarray(logits), 3)
  expected = cross_entropy(jnp.asarray(clean_logits), jax.nn.one_hot(labels, NUM_CLASSES), 0.0, class_weights).mean()
  expected = float(expected) + augmix_recipe.JSD_WEIGHT * numpy_jsd([clean_logits, *view_logits])
  assert float(loss.value) == pytest.approx(expected, rel=1e-5)
  np.testing.assert_array_equal(loss.logits, clean_logits)


def test_the_weight_is_a_float32_argument_and_zero_creates_no_extension():
  assert consistency.AugMixConsistency.create(augmix_config(**{'augmix.jsd_weight': 0.0}), None, None) is None
  extension = consistency.AugMixConsistency.create(augmix_config(), None, None)
  weight = extension.arguments()['weight']
  assert isinstance(weight, np.float32) and weight == 12  # A value the step takes, never a constant in it.
  assert extension.augmix_arguments == {'width': 3, 'depth': -1, 'severity': 3, 'alpha': 1.0}


# The refusals, each one line.


@pytest.mark.parametrize(
  'fields, message',
  [
    ({'augment.train_ops': ('crop', 'flip', 'augmix')}, "remove 'augmix' from --config.augment.train_ops"),
    ({'augment.mixup_alpha': 0.2}, 'set --config.augment.mixup_alpha=0 and --config.augment.cutmix_alpha=0'),
    ({'augment.cutmix_alpha': 1.0}, 'set --config.augment.mixup_alpha=0 and --config.augment.cutmix_alpha=0'),
    ({'optim.freeze': 'backbone'}, 'set --config.optim.freeze=none'),
    ({'optim.label_smoothing': 0.1}, 'set --config.optim.label_smoothing=0'),
    ({'adversarial.method': 'trades'}, 'set --config.adversarial.method=none'),
    ({'augmix.jsd_weight': -1.0}, r'--config.augmix.jsd_weight=-1.0 is invalid: must be >= 0'),
    ({'augment.augmix_severity': 0}, r'--config.augment.augmix_severity=0 is invalid: must be a number in 1..10'),
  ],
)
def test_contradictions_are_refused_in_one_line(fields, message):
  with pytest.raises(ConfigError, match=message) as error:
    config_checks.validate(augmix_config(**fields))
  assert '\n' not in str(error.value)


def test_the_recipe_and_augmix_without_the_loss_are_valid():
  config_checks.validate(augmix_recipe.get_config())
  config_checks.validate(augmix_config(**{'augmix.jsd_weight': 0.0, 'augment.train_ops': ('crop', 'flip', 'augmix')}))


# Training.


def test_smoke_training_with_the_loss_finishes_with_a_finite_loss(tmp_path):
  config = augmix_config(**{'num_epochs': 0.5, 'log_every_steps': 1, 'eval_every_epochs': 0.5})
  trainer.train_and_evaluate(config, str(tmp_path))
  losses = [loss for _, loss in writers.read_scalars(str(tmp_path))['train_loss']]
  assert len(losses) == 4 and np.all(np.isfinite(losses))
