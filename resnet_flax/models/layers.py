"""Building blocks shared by the architectures of `models`: squeeze-excitation, airbench's frozen
patch-whitening stem and its dirac initialisation."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def dirac(base_init: nn.initializers.Initializer | None = None) -> nn.initializers.Initializer:
  """`base_init` (default: flax's conv init, LeCun normal) with its first min(in, out) filters replaced by
  identities (airbench's dirac init): at the start each convolution passes its input channels through."""
  base_init = base_init or nn.initializers.lecun_normal()

  def init(key, shape, dtype=jnp.float32):
    *window, in_channels, out_channels = shape
    passed = min(in_channels, out_channels)
    identity = jnp.zeros((*window, in_channels, passed), dtype)
    identity = identity.at[tuple(w // 2 for w in window) + (jnp.arange(passed), jnp.arange(passed))].set(1)
    return base_init(key, shape, dtype).at[..., :passed].set(identity)

  return init


class SqueezeExcite(nn.Module):
  """Channel attention (Hu et al. 2018): rescales channels by a gate from their global mean."""

  ratio: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    gate = jnp.mean(x, axis=(1, 2), keepdims=True)
    gate = nn.relu(nn.Dense(max(1, int(channels * self.ratio)), dtype=self.dtype)(gate))
    gate = nn.sigmoid(nn.Dense(channels, dtype=self.dtype)(gate))
    return x * gate


class PatchWhitening(nn.Module):
  """A frozen `patch_size` x `patch_size` VALID convolution that whitens the image's patches (airbench).

  Its 2 * p * p * C filters are +/- the eigenvectors of the patch covariance of training images, each
  scaled by 1 / sqrt(eigenvalue + eps): set them with `whitening_kernel` after init. The optimizer
  leaves them alone (`WHITENING` names them for it) and no gradient flows into them.
  """

  patch_size: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    window = (self.patch_size, self.patch_size)
    filters = 2 * self.patch_size**2 * x.shape[-1]
    kernel = self.param('kernel', nn.initializers.zeros, (*window, x.shape[-1], filters))  # Zero until set.
    return jax.lax.conv_general_dilated(
      x, jax.lax.stop_gradient(kernel).astype(self.dtype), (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )


WHITENING = 'whitening'  # The module name of a ResNet's PatchWhitening stem.


def whitening_kernel(images: jax.Array, patch_size: int = 2, eps: float = 5e-4) -> jax.Array:
  """The PatchWhitening kernel [p, p, C, 2 * p * p * C] for normalized float images [N, H, W, C]."""
  channels = images.shape[-1]
  patches = jax.lax.conv_general_dilated_patches(
    jnp.asarray(images, jnp.float32),
    (patch_size, patch_size),
    (1, 1),
    'VALID',
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  )  # [N, H', W', C * p * p], channel-major.
  patches = patches.reshape(-1, patches.shape[-1])
  eigenvalues, eigenvectors = jnp.linalg.eigh(patches.T @ patches / patches.shape[0])
  filters = eigenvectors / jnp.sqrt(eigenvalues + eps)  # Columns: one filter each, in (c, h, w) order.
  filters = filters.reshape(channels, patch_size, patch_size, -1).transpose(1, 2, 0, 3)
  return jnp.concatenate([filters, -filters], axis=-1)


def set_patch_whitening(variables: dict[str, Any], normalized_images: jax.Array) -> dict[str, Any]:
  """`variables` of a model with a whitening stem, its kernel set from normalized training images [N, H, W, C]."""
  params = {**variables['params'], WHITENING: {'kernel': whitening_kernel(normalized_images)}}
  return {**variables, 'params': params}
