"""AugMix (Hendrycks et al. 2020): one uint8 image -> a convex mix of itself and of augmentation chains.

    out = (1 - m) * image + m * sum_i w_i chain_i(image),   w ~ Dirichlet(alpha), m ~ Beta(alpha, alpha)

as `augment_and_mix` of the paper's code (google-research/augmix): `width` chains, each of `depth` ops
(-1: a depth uniform in 1..MAX_DEPTH per chain), each op drawn uniformly from `OPS` at a level uniform
in [0.1, severity], mapped to the op's parameter as the paper's `augmentations.py` maps it. The mixing
is in float32 pixel space (the paper mixes normalised tensors: the same, normalisation being affine
per channel); the result is float32 pixel values in [0, 255].

`OPS` is the paper's `augmentations` list, which leaves out the ops that overlap the CIFAR-10-C
corruptions (color, contrast, brightness, sharpness: `EXCLUDED`), so that a corruption benchmark
measures robustness to what training never showed. The ops are `policies`' (PIL's arithmetic), with
their geometry: nearest-neighbour resampling and grey fill, where the paper's code resamples
bilinearly and fills with black.

Written by hand: no maintained JAX library does AugMix, and the paper's code runs per image in PIL on
the host. This runs per example under `vmap`, inside the jitted step, with static shapes: every chain
has MAX_DEPTH positions, those past its drawn depth applying the identity, and the op of a position
is a `lax.switch` on a traced index (under `vmap` it evaluates every op and selects one, so a chain
position costs about all nine ops together). This module knows nothing of configs; `augment`
registers `augment_and_mix` as the train op 'augmix'.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from resnet_flax.data import policies

MAX_DEPTH = 3  # depth=-1 draws a chain's depth uniformly in 1..MAX_DEPTH (the paper's np.random.randint(1, 4)).
LOWEST_LEVEL = 0.1  # The paper's sample_level: uniform in [0.1, severity].
LEVEL_SCALE = 10  # The paper's int_parameter/float_parameter: a level is a fraction of 10 of the op's maximum.
MAX_SEVERITY = LEVEL_SCALE
EXCLUDED = ('color', 'contrast', 'brightness', 'sharpness')  # Overlap CIFAR-10-C's corruptions: never used.

# An op as a chain applies it: (uint8 image, level in [0.1, severity], negate the parameter) -> uint8 image.
ChainOp = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _int_parameter(level: jax.Array, maximum: float) -> jax.Array:
  """The paper's int(level * maximum / 10): levels are positive, so truncation is floor."""
  return jnp.floor(level * maximum / LEVEL_SCALE)


def _float_parameter(level: jax.Array, maximum: float) -> jax.Array:
  return level * maximum / LEVEL_SCALE


def _signed(value: jax.Array, negate: jax.Array) -> jax.Array:
  """The geometric ops' random direction (the paper's `if np.random.uniform() > 0.5: level = -level`)."""
  return jnp.where(negate, -value, value)


def _translate_pixels(level: jax.Array, side: int, negate: jax.Array) -> jax.Array:
  """Up to a third of the side, in whole pixels (the paper's IMAGE_SIZE / 3)."""
  return _signed(_int_parameter(level, side / 3), negate)


OPS: dict[str, ChainOp] = {
  'autocontrast': lambda image, level, negate: policies.auto_contrast(image),
  'equalize': lambda image, level, negate: policies.equalize(image),
  'posterize': lambda image, level, negate: policies.posterize(image, 4 - _int_parameter(level, 4)),
  'rotate': lambda image, level, negate: policies.rotate(image, _signed(_int_parameter(level, 30), negate)),
  'solarize': lambda image, level, negate: policies.solarize(image, 256 - _int_parameter(level, 256)),
  'shear_x': lambda image, level, negate: policies.shear_x(image, _signed(_float_parameter(level, 0.3), negate)),
  'shear_y': lambda image, level, negate: policies.shear_y(image, _signed(_float_parameter(level, 0.3), negate)),
  'translate_x': lambda image, level, negate: policies.translate_x(
    image, _translate_pixels(level, image.shape[1], negate)
  ),
  'translate_y': lambda image, level, negate: policies.translate_y(
    image, _translate_pixels(level, image.shape[0], negate)
  ),
}
_IDENTITY: ChainOp = lambda image, level, negate: image


# The arguments' checks (`augment.register_op`'s, and the rules of the augment.augmix_* fields).


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def check_width(value: Any) -> str | None:
  return None if _is_int(value) and value >= 1 else 'must be an integer >= 1'


def check_depth(value: Any) -> str | None:
  return None if _is_int(value) and (value == -1 or value >= 1) else 'must be -1 (1..3 at random) or an integer >= 1'


def check_severity(value: Any) -> str | None:
  in_range = isinstance(value, (int, float)) and not isinstance(value, bool) and 1 <= value <= MAX_SEVERITY
  return None if in_range else f'must be a number in 1..{MAX_SEVERITY}'


def check_alpha(value: Any) -> str | None:
  return None if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else 'must be > 0'


# The augmentation.


def _chain(key: jax.Array, image: jax.Array, depth: int, severity: float) -> jax.Array:
  """One chain: `depth` ops (-1: 1..MAX_DEPTH at random), each uniform over OPS at a level in [0.1, severity]."""
  depth_key, *position_keys = jax.random.split(key, 1 + (depth if depth > 0 else MAX_DEPTH))
  drawn_depth = depth if depth > 0 else jax.random.randint(depth_key, (), 1, MAX_DEPTH + 1)
  branches = [_IDENTITY, *OPS.values()]
  for position, position_key in enumerate(position_keys):
    op_key, level_key, sign_key = jax.random.split(position_key, 3)
    op = jax.random.randint(op_key, (), 0, len(OPS)) + 1
    level = jax.random.uniform(level_key, (), jnp.float32, LOWEST_LEVEL, severity)
    image = jax.lax.switch(
      jnp.where(position < drawn_depth, op, 0), branches, image, level, jax.random.bernoulli(sign_key)
    )
  return image


def augment_and_mix(
  key: jax.Array, image: jax.Array, *, width: int = 3, depth: int = -1, severity: float = 3, alpha: float = 1.0
) -> jax.Array:
  """AugMix of one uint8 [H, W, C] image: float32 pixel values in [0, 255] (the module docstring's formula)."""
  if image.dtype != jnp.uint8:
    raise ValueError('augmix works on uint8 pixels: put it before cutout in train_ops.')
  weights_key, skip_key, chains_key = jax.random.split(key, 3)
  weights = jax.random.dirichlet(weights_key, jnp.full((width,), alpha, jnp.float32))
  skip = jax.random.beta(skip_key, alpha, alpha)
  chain = lambda chain_key: _chain(chain_key, image, depth, severity)
  chains = jax.vmap(chain)(jax.random.split(chains_key, width)).astype(jnp.float32)
  mixed = (1 - skip) * image.astype(jnp.float32) + skip * jnp.tensordot(weights, chains, axes=1)
  return jnp.clip(mixed, 0, 255)  # The weights sum to 1 up to rounding: keep exact bounds.
