"""Augmentation ops by registration: op strings with arguments, `check_ops`' messages, ops that do not
draw from the step key, and a new op registered here alone, trained through the config."""

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default, smoke
from resnet_flax.data import augment
from resnet_flax.train import trainer

ROOT = Path(__file__).resolve().parents[1]
ZERO_MEAN, UNIT_STD = (0.0,) * 3, (1.0,) * 3  # Identity normalization up to the 1/255 scale.
BUILT_IN = ', '.join(
  ('crop', 'flip', 'alternating_flip', 'cutout', 'autoaugment', 'randaugment', 'trivialaugment', 'augmix')
)


def _config(ops, **overrides) -> ml_collections.ConfigDict:
  """The default augment config with these train_ops (built anew: the field's type is not enforced)."""
  return ml_collections.ConfigDict({**default.get_config().augment.to_dict(), 'train_ops': ops, **overrides})


def _pixels(images, ops, key=0, epoch=0, **overrides) -> np.ndarray:
  """augment_batch under jit with identity normalization: the exact pixel values (examples indexed 0..B-1)."""
  config = _config(tuple(ops), **overrides)
  augment_fn = jax.jit(
    lambda x, k, e: augment.augment_batch(
      x, k, config, ZERO_MEAN, UNIT_STD, indices=jnp.arange(len(x)), epoch=e, seed=1
    )
  )
  return np.rint(np.asarray(augment_fn(images, jax.random.key(key), epoch)) * 255).astype(np.int64)


def _images(n=48, side=32, high=256, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, high, (n, side, side, 3), dtype=np.uint8)


@pytest.fixture
def add_amount():
  """Registers 'add_amount' for one test: adds `amount` to every uint8 pixel, and records (amount,
  example index, epoch) per example it augments. Yields the records; unregisters the op afterwards."""
  records = []

  def integer(value):
    return None if isinstance(value, int) else 'must be an integer'

  @augment.register_op('add_amount', uses_key=False, checks={'amount': integer})
  def _add_amount(key, image, context, amount=1):
    jax.debug.callback(lambda *values: records.append(tuple(map(int, values))), amount, context.index, context.epoch)
    return image + jnp.asarray(amount, image.dtype)

  yield records
  del augment.OPS['add_amount']


def test_op_arguments_in_the_string_equal_the_config_fields():
  images = _images()
  pairs = [
    (('crop(padding=2)',), {'crop_padding': 2}),
    ((" crop( padding = 2, pad_mode = 'constant' )",), {'crop_padding': 2, 'pad_mode': 'constant'}),
    (('cutout(size=16)',), {'cutout_size': 16}),
    (('cutout(size=3)',), {'cutout_size': 3}),
  ]
  for ops, fields in pairs:
    by_field = _pixels(images, [op.split('(')[0].strip() for op in ops], **fields)
    np.testing.assert_array_equal(_pixels(images, ops), by_field, err_msg=str(ops))
    overridden = _pixels(images, ops, cutout_size=9, crop_padding=7)  # The string wins over the fields.
    np.testing.assert_array_equal(overridden, by_field, err_msg=str(ops))
  assert not np.array_equal(_pixels(images, ('crop(padding=2)',)), _pixels(images, ('crop',)))  # Default: 4.


@pytest.mark.parametrize(
  'ops, overrides, message',
  [
    (('crop', 'rotate'), {}, f"Unknown augmentation op 'rotate': registered ops are {BUILT_IN}."),
    (('cutout(sise=16)',), {}, "Op 'cutout' has no argument 'sise': its arguments are size."),
    (('flip(p=0.5)',), {}, "Op 'flip' has no argument 'p': its arguments are none."),
    (("crop(pad_mode='wrap')",), {}, "Op 'crop': pad_mode='wrap' must be one of reflect, constant."),
    (('crop',), {'pad_mode': 'wrap'}, "Op 'crop': pad_mode='wrap' (from augment.pad_mode) must be one of reflect,"),
    (('cutout(size=-1)',), {}, "Op 'cutout': size=-1 must be an integer >= 0."),
    (('cutout(size=2.5)',), {}, "Op 'cutout': size=2.5 must be an integer >= 0."),
    (('crop',), {'crop_padding': -4}, "Op 'crop': padding=-4 (from augment.crop_padding) must be an integer >= 0."),
    (('randaugment(magnitude=31)',), {}, "Op 'randaugment': magnitude=31 must be a number in 0..30."),
    (('cutout(16)',), {}, "Malformed augmentation op 'cutout(16)': write 'name' or 'name(arg=value, ...)' with"),
    (('cutout(size=16',), {}, "Malformed augmentation op 'cutout(size=16'"),
    (('cutout(size=x)',), {}, "Malformed augmentation op 'cutout(size=x)'"),
    (('cutout(size=1, size=2)',), {}, "Malformed augmentation op 'cutout(size=1, size=2)'"),
    (('cutout(**{})',), {}, 'Malformed augmentation op'),
    (("cutout(size=__import__('os').getpid())",), {}, 'Malformed augmentation op'),
    (('augment.crop',), {}, "Malformed augmentation op 'augment.crop'"),
    ('crop', {}, "train_ops must be a tuple of ops, not the string 'crop': write ('crop',)."),
    (('crop', 3), {}, "train_ops must be a tuple of op strings such as ('crop', 'cutout(size=16)'), not ('crop', 3)."),
    (('crop', 'flip'), {'alternating_flip': True}, "alternating_flip replaces the 'flip' op"),
    (('alternating_flip', 'crop'), {'alternating_flip': True}, 'alternating_flip twice'),
  ],
)
def test_check_ops_names_the_bad_op_or_argument_in_one_line(ops, overrides, message):
  with pytest.raises(ValueError) as error:
    augment.check_ops(_config(ops, **overrides))
  assert str(error.value).startswith(message) and '\n' not in str(error.value)


def test_check_ops_accepts_every_registered_op_and_today_s_configs():
  augment.check_ops(_config(()))
  augment.check_ops(_config(('crop(padding=0)', 'flip', 'randaugment(num_ops=0, magnitude=30.0)', 'cutout(size=0)')))
  augment.check_ops(_config(('crop', 'alternating_flip'), alternating_flip=False))
  for name in augment.OPS:
    augment.check_ops(_config((name,)))


def test_alternating_flip_in_train_ops_equals_the_config_field():
  images = _images()
  for epoch in (0, 1):
    by_field = _pixels(images, ('crop', 'cutout'), epoch=epoch, alternating_flip=True)
    np.testing.assert_array_equal(_pixels(images, ('alternating_flip', 'crop', 'cutout'), epoch=epoch), by_field)
  assert not np.array_equal(by_field, _pixels(images, ('crop', 'cutout'), epoch=1))


def test_ops_without_the_step_key_leave_the_draws_of_the_others(add_amount):
  """alternating_flip leaves mirror-symmetric images as they are, add_amount(amount=0) any image:
  inserted before or between key-drawing ops, they must not change those ops' draws."""
  half = _images(side=16)
  symmetric = np.concatenate([half, half[:, :, ::-1]], axis=2)
  expected = _pixels(symmetric, ('crop', 'cutout'))
  np.testing.assert_array_equal(_pixels(symmetric, ('alternating_flip', 'crop', 'cutout')), expected)
  np.testing.assert_array_equal(_pixels(symmetric, ('crop', 'add_amount(amount=0)', 'cutout')), expected)
  images = _images()
  np.testing.assert_array_equal(
    _pixels(images, ('crop', 'add_amount(amount=0)', 'flip', 'cutout')), _pixels(images, ('crop', 'flip', 'cutout'))
  )


def test_a_registered_op_takes_its_argument_from_the_string_and_sees_each_example(add_amount):
  images = _images(n=8, side=8, high=200)
  cropped_flipped = _pixels(images, ('crop', 'flip'))
  np.testing.assert_array_equal(_pixels(images, ('crop', 'flip', 'add_amount(amount=3)'), epoch=5), cropped_flipped + 3)
  np.testing.assert_array_equal(_pixels(images, ('crop', 'flip', 'add_amount')), cropped_flipped + 1)  # Its default.
  jax.effects_barrier()
  assert sorted(add_amount) == sorted([(3, i, 5) for i in range(8)] + [(1, i, 0) for i in range(8)])
  with pytest.raises(ValueError, match=r"^Op 'add_amount': amount=2.5 must be an integer\.$"):
    augment.check_ops(_config(('add_amount(amount=2.5)',)))
  with pytest.raises(ValueError, match=r'registered ops are .*, add_amount\.$'):
    augment.check_ops(_config(('nope',)))


def test_register_op_refuses_a_taken_name_and_arguments_the_op_lacks():
  before = dict(augment.OPS)
  with pytest.raises(ValueError, match="'crop': taken"):
    augment.register_op('crop')(lambda key, image, context: image)
  with pytest.raises(ValueError, match='not an identifier'):
    augment.register_op('my-op')(lambda key, image, context: image)
  with pytest.raises(ValueError, match='arguments other than size'):
    augment.register_op('square', fields={'side': 'cutout_size'})(lambda key, image, context, size=1: image)
  with pytest.raises(TypeError, match=r'\(key, image, context'):
    augment.register_op('unary')(lambda image: image)
  assert augment.OPS == before


def test_training_runs_a_newly_registered_op_with_its_argument(add_amount, tmp_path):
  """One decorated function in this file is the whole of the new op: no package file names it."""
  package_files = [*(ROOT / 'resnet_flax').rglob('*.py'), *(ROOT / 'configs').rglob('*.py'), ROOT / 'main.py']
  assert not [path for path in package_files if 'add_amount' in path.read_text()]
  config = smoke.get_config()
  config.num_epochs = 1.0
  config.augment.train_ops = ('crop', 'flip', 'add_amount(amount=3)')
  trainer.train_and_evaluate(config, str(tmp_path))
  jax.effects_barrier()
  amounts, indices, epochs = zip(*add_amount, strict=True)
  assert set(amounts) == {3} and set(epochs) == {0}
  assert sorted(indices) == list(range(config.data.synthetic_train_size))  # Each training example once.
