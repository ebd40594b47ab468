"""On-device training augmentation: registered per-example ops, pure JAX, run inside the jitted step.

`train_ops` lists the ops in order, each written 'name' or 'name(arg=value, ...)' with literal values:
  crop(padding, pad_mode)  pad (reflect, or constant black) and take a random crop of the original size;
  flip                     mirror left-right with probability 1/2;
  alternating_flip         airbench's flip: each training example one way in even epochs, the other
                           way in odd ones (`augment.alternating_flip=True` runs it before train_ops);
  cutout(size)             fill a square with the dataset mean colour; `normalize` maps that colour to
                           exactly 0, which is the standard Cutout of the normalized image (DeVries &
                           Taylor, 2017);
  autoaugment, randaugment(num_ops, magnitude), trivialaugment
                           the policies of `policies` (AutoAugment CIFAR-10, RandAugment on
                           torchvision's 0..30 magnitude scale, TrivialAugment Wide);
  augmix(width, depth, severity, alpha)
                           `augmix.augment_and_mix` (Hendrycks et al. 2020); returns float32 pixel
                           values, like cutout. With its consistency loss (`augmix.jsd_weight`) the
                           train step makes the AugMix views itself (train/consistency.py).
An argument left out comes from its config field (crop_padding, pad_mode, cutout_size,
randaugment_num_ops, randaugment_magnitude, augmix_*), so 'crop' means what it always did. A new op is one
function decorated with `register_op`; `check_ops` validates a config without tracing anything.

Every random choice is a function of (step key, example index, op position), so a resumed run
augments exactly like an uninterrupted one, and the batch may be sharded along a mesh axis of type
Auto (Explicit axes reject the unsharded keys): the work is one `vmap` over examples, with static
shapes and no data-dependent branches. Positions count only the ops that draw from the step key: an
op registered with `uses_key=False` (alternating_flip draws from the seed and the example index)
leaves the draws of the others unchanged.

Crop and flip move uint8 pixels (a quarter of the bytes of float32); the first cutout turns the
image into float32 pixel values, and `normalize` runs last, on the whole batch. The three policies
and augmix need uint8 pixels, so they come before cutout (as in the AutoAugment paper: policy, then Cutout).
benchmarks/augment_cost.py measures what each op adds to a train step.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from resnet_flax.data import augmix, policies

PAD_MODES = ('reflect', 'constant')
# Test-time augmentation (`eval.tta`): the (flip, shift) views of `view` whose softmax is averaged.
TTA_VIEWS: dict[str, tuple[tuple[bool, int], ...]] = {
  'none': ((False, 0),),
  'flip': ((False, 0), (True, 0)),
  'flip+translate': tuple((flip, shift) for shift in (0, 1, -1) for flip in (False, True)),
}
ALTERNATING_FLIP_STREAM = 2**32 - 1  # fold_in data of the flips' key; steps (the other fold_ins) stay below.

# What is wrong with an argument's value, or None: `register_op`'s checks.
Check = Callable[[Any], str | None]
OpFn = TypeVar('OpFn', bound=Callable[..., jax.Array])


def _mean_colour(mean: Sequence[float]) -> jax.Array:
  """The mean in pixel units, float32: Cutout fills with it, `normalize` subtracts it, so it becomes 0."""
  return jnp.asarray(mean, jnp.float32) * 255


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """uint8 (or float pixel values) [..., H, W, C] -> float32 (x/255 - mean)/std per channel."""
  return (images.astype(jnp.float32) - _mean_colour(mean)) / (jnp.asarray(std, jnp.float32) * 255)


def channel_stats(images: np.ndarray, chunk_size: int = 256) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and (population) std of uint8 [N, ..., C] images, scaled to [0, 1].

  A histogram of the 256 pixel values per channel, filled `chunk_size` images at a time: exact, and
  little memory however many images there are.
  """
  channels = images.shape[-1]
  counts = np.zeros((channels, 256), np.int64)
  for start in range(0, len(images), chunk_size):
    pixels = np.asarray(images[start : start + chunk_size], np.uint8).reshape(-1, channels)
    for c in range(channels):
      counts[c] += np.bincount(pixels[:, c], minlength=256)
  values = np.arange(256) / 255
  num_pixels = counts.sum(axis=1)
  mean = counts @ values / num_pixels
  std = np.sqrt(np.maximum(counts @ values**2 / num_pixels - mean**2, 0))
  return tuple(map(float, mean)), tuple(map(float, std))


def example_keys(key: jax.Array, batch_size: int) -> jax.Array:
  """Key of example i = fold_in(key, i), i being the example's index in the global batch."""
  return jax.vmap(functools.partial(jax.random.fold_in, key))(jnp.arange(batch_size))


def view(images: jax.Array, flip: bool, shift: int) -> jax.Array:
  """uint8 [B, H, W, C] mirrored and/or moved `shift` pixels down and right (reflect padding)."""
  if shift:
    height, width = images.shape[1:3]
    padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='reflect')
    images = padded[:, 1 - shift : 1 - shift + height, 1 - shift : 1 - shift + width]
  return images[:, :, ::-1] if flip else images


# The registry of train ops.


class OpContext(NamedTuple):
  """What an op may use besides its key and image."""

  index: jax.Array  # The example's index in the training split (traced int).
  epoch: jax.Array | int  # The epoch of the step (traced int).
  seed: int  # config.seed.
  mean: Sequence[float]  # The dataset mean per channel in [0, 1], as `normalize` takes it.


@dataclasses.dataclass(frozen=True)
class Op:
  """A registered op: `fn(key, image, context, **arguments)`, and where its arguments come from."""

  fn: Callable[..., jax.Array]
  arguments: tuple[str, ...]  # fn's parameters after `context`.
  defaults: Mapping[str, Any]  # fn's parameter defaults.
  fields: Mapping[str, str]  # argument -> the augment config field it defaults to.
  checks: Mapping[str, Check]
  uses_key: bool


OPS: dict[str, Op] = {}


def register_op(
  name: str,
  *,
  uses_key: bool = True,
  fields: Mapping[str, str] | None = None,
  checks: Mapping[str, Check] | None = None,
) -> Callable[[OpFn], OpFn]:
  """Decorator: registers `fn(key, image, context, **arguments) -> image` as the train op `name`.

  `fn` runs per example under `vmap`: `image` is [H, W, C] pixel values (uint8 until an op makes them
  float), `context` an OpContext, `key` the example's own key for this op, or None if not
  `uses_key`. Its arguments are its parameters after `context`; each takes its value from the op
  string ('name(arg=value)'), else from the augment config field `fields[arg]`, else from its
  default. `checks[arg](value)` says what is wrong with a value, or returns None.
  """
  fields, checks = dict(fields or {}), dict(checks or {})

  def register(fn: OpFn) -> OpFn:
    parameters = list(inspect.signature(fn).parameters.values())
    arguments = tuple(p.name for p in parameters[3:])
    if name in OPS or not name.isidentifier():
      raise ValueError(f'Cannot register op {name!r}: {"taken" if name in OPS else "not an identifier"}.')
    if len(parameters) < 3:
      raise TypeError(f'Op {name!r} must take (key, image, context, **arguments).')
    if not set(fields) | set(checks) <= set(arguments):
      raise ValueError(f'Op {name!r}: fields and checks name arguments other than {", ".join(arguments)}.')
    defaults = {p.name: p.default for p in parameters[3:] if p.default is not inspect.Parameter.empty}
    OPS[name] = Op(fn, arguments, defaults, fields, checks, uses_key)
    return fn

  return register


def _parse(text: str) -> tuple[str, dict[str, Any]]:
  """'name' or 'name(arg=value, ...)', values Python literals -> (name, {arg: value}); nothing evaluated."""
  try:
    node = ast.parse(text.strip(), mode='eval').body
    if isinstance(node, ast.Name):
      return node.id, {}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args:
      names = [keyword.arg for keyword in node.keywords]
      if all(names) and len(set(names)) == len(names):  # Neither **mapping nor an argument given twice.
        return node.func.id, {keyword.arg: ast.literal_eval(keyword.value) for keyword in node.keywords}
  except (SyntaxError, ValueError, TypeError):
    pass
  raise ValueError(f"Malformed augmentation op {text!r}: write 'name' or 'name(arg=value, ...)' with literal values.")


class _Step(NamedTuple):
  name: str
  op: Op
  arguments: dict[str, Any]


def _resolve(text: str, aug_config) -> _Step:
  """The op of one train_ops entry and its checked arguments."""
  name, given = _parse(text)
  if name not in OPS:
    raise ValueError(f'Unknown augmentation op {name!r}: registered ops are {", ".join(OPS)}.')
  op = OPS[name]
  for argument in given:
    if argument not in op.arguments:
      raise ValueError(
        f'Op {name!r} has no argument {argument!r}: its arguments are {", ".join(op.arguments) or "none"}.'
      )
  arguments = {}
  for argument in op.arguments:
    field = op.fields.get(argument)
    if argument in given:
      value, source = given[argument], ''
    elif field is not None and field in aug_config:
      value, source = aug_config[field], f' (from augment.{field})'
    elif argument in op.defaults:
      value, source = op.defaults[argument], ' (its default)'
    else:
      raise ValueError(f'Op {name!r} needs a value for {argument!r}: write {name}({argument}=...).')
    problem = op.checks[argument](value) if argument in op.checks else None
    if problem:
      raise ValueError(f'Op {name!r}: {argument}={value!r}{source} {problem}.')
    arguments[argument] = value
  return _Step(name, op, arguments)


def _steps(aug_config) -> list[_Step]:
  """The ops augment_batch runs, in order: alternating_flip first if the config's field asks for it."""
  ops = aug_config.train_ops
  if isinstance(ops, str):
    raise ValueError(f'train_ops must be a tuple of ops, not the string {ops!r}: write ({ops!r},).')
  if not isinstance(ops, (tuple, list)) or not all(isinstance(op, str) for op in ops):
    raise ValueError(f"train_ops must be a tuple of op strings such as ('crop', 'cutout(size=16)'), not {ops!r}.")
  ops = ('alternating_flip', *ops) if aug_config.get('alternating_flip', False) else tuple(ops)
  steps = [_resolve(op, aug_config) for op in ops]
  names = [step.name for step in steps]
  if 'alternating_flip' in names and 'flip' in names:
    raise ValueError("alternating_flip replaces the 'flip' op: keep only one of them.")
  if names.count('alternating_flip') > 1:
    raise ValueError('alternating_flip twice (augment.alternating_flip=True also adds it): the flips cancel out.')
  return steps


def check_ops(aug_config) -> None:
  """Raises a one-line ValueError naming the first bad op or argument, and what it could be."""
  _steps(aug_config)


def op_arguments(text: str, aug_config) -> dict[str, Any]:
  """The checked arguments of the op `text` ('name' or 'name(arg=value, ...)') as `augment_batch` would
  call it under `aug_config`; a one-line ValueError as `check_ops` raises."""
  return _resolve(text, aug_config).arguments


def augment_batch(
  images: jax.Array,
  key: jax.Array,
  aug_config,
  mean: Sequence[float],
  std: Sequence[float],
  *,
  indices: jax.Array,
  epoch: jax.Array | int,
  seed: int,
) -> jax.Array:
  """uint8 [B, H, W, C] -> float32 normalized, applying `aug_config.train_ops` in order (after
  alternating_flip if the config's `alternating_flip` field is True).

  `indices` [B] are the examples' indices in the training split, `epoch` the step's epoch. Example i
  draws the key-using op number j from fold_in(example_keys(key, B)[i], j): ops are independent of
  each other, and appending an op leaves the draws of the earlier ones unchanged.
  """
  steps = _steps(aug_config)

  def augment_one(example_key: jax.Array, image: jax.Array, index: jax.Array) -> jax.Array:
    context = OpContext(index, epoch, seed, mean)
    position = 0
    for step in steps:
      op_key = None
      if step.op.uses_key:  # Ops that draw from elsewhere take no position: the others' draws stay put.
        op_key, position = jax.random.fold_in(example_key, position), position + 1
      image = step.op.fn(op_key, image, context, **step.arguments)
    return image

  augmented = jax.vmap(augment_one)(example_keys(key, images.shape[0]), images, indices)
  return normalize(augmented, mean, std)


# The ops.


def _non_negative_int(value: Any) -> str | None:
  return None if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 'must be an integer >= 0'


def _one_of(options: Sequence[Any]) -> Check:
  return lambda value: None if value in options else f'must be one of {", ".join(map(str, options))}'


def _level(value: Any) -> str | None:
  in_range = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= policies.NUM_LEVELS - 1
  return None if in_range else f'must be a number in 0..{policies.NUM_LEVELS - 1}'


@register_op(
  'crop',
  fields={'padding': 'crop_padding', 'pad_mode': 'pad_mode'},
  checks={'padding': _non_negative_int, 'pad_mode': _one_of(PAD_MODES)},
)
def _crop(key: jax.Array, image: jax.Array, context: OpContext, padding: int, pad_mode: str) -> jax.Array:
  """Pads by `padding` on each side, then crops H x W at offsets uniform over [0, 2 * padding]."""
  padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)), mode=pad_mode)
  top, left = jax.random.randint(key, (2,), 0, 2 * padding + 1)
  return jax.lax.dynamic_slice(padded, (top, left, 0), image.shape)


@register_op('flip')
def _flip(key: jax.Array, image: jax.Array, context: OpContext) -> jax.Array:
  """Mirrors left-right with probability 1/2, branch-free.

  It chooses the column order rather than selecting between two images: after a crop, XLA fuses
  this gather with the crop's, which makes crop + flip cheaper on CPU.
  """
  columns = jnp.arange(image.shape[1])
  return image[:, jnp.where(jax.random.bernoulli(key), columns[::-1], columns)]


@register_op('alternating_flip', uses_key=False)
def _alternating_flip(key: None, image: jax.Array, context: OpContext) -> jax.Array:
  """airbench's alternating flip: training example `i` is mirrored in even epochs with probability 1/2,
  a fixed draw from (seed, i), and the other way in odd epochs. Every pair of epochs shows each image
  both ways, where independent flips repeat an orientation half of the time.
  """
  flips_key = jax.random.fold_in(jax.random.key(context.seed), ALTERNATING_FLIP_STREAM)
  in_even_epochs = jax.random.bernoulli(jax.random.fold_in(flips_key, context.index))
  return jnp.where(in_even_epochs ^ (context.epoch % 2 == 1), image[:, ::-1], image)


@register_op('cutout', fields={'size': 'cutout_size'}, checks={'size': _non_negative_int})
def _cutout(key: jax.Array, image: jax.Array, context: OpContext, size: int) -> jax.Array:
  """Fills a size x size square with the mean colour, centred uniformly over the image and clipped at
  its borders.

  Rows [cy - size//2, cy - size//2 + size) and likewise for columns, so the side is exactly `size`
  away from the borders, odd sizes included. Returns float32 pixel values.
  """
  height, width, _ = image.shape
  centre_y, centre_x = jax.random.randint(key, (2,), 0, jnp.array([height, width]))
  top, left = centre_y - size // 2, centre_x - size // 2
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
  return jnp.where(inside[..., None], _mean_colour(context.mean), image.astype(jnp.float32))


@register_op('autoaugment')
def _autoaugment(key: jax.Array, image: jax.Array, context: OpContext) -> jax.Array:
  return policies.autoaugment(key, image)


@register_op(
  'randaugment',
  fields={'num_ops': 'randaugment_num_ops', 'magnitude': 'randaugment_magnitude'},
  checks={'num_ops': _non_negative_int, 'magnitude': _level},
)
def _randaugment(key: jax.Array, image: jax.Array, context: OpContext, num_ops: int, magnitude: float) -> jax.Array:
  return policies.randaugment(key, image, num_ops=num_ops, magnitude=magnitude)


@register_op('trivialaugment')
def _trivialaugment(key: jax.Array, image: jax.Array, context: OpContext) -> jax.Array:
  return policies.trivialaugment(key, image)


@register_op(
  'augmix',
  fields={'width': 'augmix_width', 'depth': 'augmix_depth', 'severity': 'augmix_severity', 'alpha': 'augmix_alpha'},
  checks={
    'width': augmix.check_width,
    'depth': augmix.check_depth,
    'severity': augmix.check_severity,
    'alpha': augmix.check_alpha,
  },
)
def _augmix(
  key: jax.Array, image: jax.Array, context: OpContext, width: int, depth: int, severity: float, alpha: float
) -> jax.Array:
  return augmix.augment_and_mix(key, image, width=width, depth=depth, severity=severity, alpha=alpha)
