"""Compact ResNets in Flax linen, and the registry of named presets.

`python -m resnet_flax.models` prints every preset with its trainable parameter count.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

ModuleDef = Any

BATCH_NORM_MOMENTUM = 0.9  # The recipes' value; flax defaults to 0.99.
BATCH_NORM_EPSILON = 1e-5


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


class ResNetBlock(nn.Module):
  """Basic block: two 3x3 convolutions."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  se_ratio: float = 0.0
  last_norm_scale_init: Callable = nn.initializers.ones

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides)(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm(scale_init=self.last_norm_scale_init)(y)
    if self.se_ratio:
      y = SqueezeExcite(self.se_ratio, dtype=y.dtype)(y)
    return nn.relu(y + _shortcut(residual, y.shape[-1], self.strides, self.conv, self.norm))


class BottleneckResNetBlock(nn.Module):
  """Bottleneck block: 1x1 reduce, 3x3, 1x1 expand to 4x `filters`."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  se_ratio: float = 0.0
  last_norm_scale_init: Callable = nn.initializers.ones
  expansion: int = 4

  @nn.compact
  def __call__(self, x):
    residual = x
    y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x)))
    y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), self.strides)(y)))
    y = self.conv(self.filters * self.expansion, (1, 1))(y)
    y = self.norm(scale_init=self.last_norm_scale_init)(y)
    if self.se_ratio:
      y = SqueezeExcite(self.se_ratio, dtype=y.dtype)(y)
    return nn.relu(y + _shortcut(residual, y.shape[-1], self.strides, self.conv, self.norm))


def _shortcut(x, channels: int, strides: int, conv: ModuleDef, norm: ModuleDef):
  """Identity, or a strided 1x1 projection + BN where the shape changes."""
  if x.shape[-1] == channels and strides == 1:
    return x
  return norm(name='shortcut_norm')(conv(channels, (1, 1), strides, name='shortcut_conv')(x))


class ResNet(nn.Module):
  """ResNet with a CIFAR stem (3x3, stride 1) or an ImageNet stem (7x7 stride 2 + max-pool)."""

  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  widths: Sequence[int]
  num_classes: int
  stem: str = 'cifar'
  stem_width: int | None = None  # Defaults to widths[0].
  dropout_rate: float = 0.0
  se_ratio: float = 0.0
  zero_init_residual: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, padding='SAME')
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=BATCH_NORM_MOMENTUM,
                             epsilon=BATCH_NORM_EPSILON, dtype=self.dtype)
    x = self._stem(x.astype(self.dtype), conv, norm)
    last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    for stage, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for block in range(num_blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = self.block_cls(width, conv=conv, norm=norm, strides=strides, se_ratio=self.se_ratio,
                           last_norm_scale_init=last_scale)(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
    return x.astype(jnp.float32)

  def _stem(self, x, conv, norm):
    width = self.stem_width or self.widths[0]
    if self.stem == 'cifar':
      return nn.relu(norm(name='stem_norm')(conv(width, (3, 3), name='stem_conv')(x)))
    if self.stem == 'imagenet':
      x = nn.relu(norm(name='stem_norm')(conv(width, (7, 7), (2, 2), name='stem_conv')(x)))
      return nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    raise ValueError(f"unknown stem {self.stem!r}; use 'cifar' or 'imagenet'")


PRESETS: dict[str, Callable[..., ResNet]] = {
    'resnet18': functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=ResNetBlock,
                                  widths=(32, 64, 128, 256)),
    'resnet26': functools.partial(ResNet, stage_sizes=(3, 3, 3, 3), block_cls=ResNetBlock,
                                  widths=(32, 64, 128, 256)),
    'resnet34': functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=ResNetBlock,
                                  widths=(40, 80, 144, 176)),
    'resnet50': functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckResNetBlock,
                                  widths=(24, 48, 96, 192)),
    'resnet18_imagenet_stem': functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=ResNetBlock,
                                                widths=(64, 128, 256, 512), stem='imagenet'),
    # A tiny net for smoke tests and quick CPU runs.
    'resnet_tiny': functools.partial(ResNet, stage_sizes=(1, 1, 1), block_cls=ResNetBlock,
                                     widths=(16, 32, 64)),
}


def create_model(name: str, num_classes: int, **kwargs) -> ResNet:
  """Builds preset `name`; `kwargs` override its fields (dtype, dropout_rate, se_ratio, ...)."""
  if name not in PRESETS:
    raise ValueError(f'unknown model.name {name!r}; choose one of {sorted(PRESETS)}')
  return PRESETS[name](num_classes=num_classes, **kwargs)


def init_variables(model: nn.Module, image_shape: Sequence[int], key: jax.Array | None = None):
  """Initial {'params', 'batch_stats'}; with no key only their shapes (nothing is computed)."""
  dummy = jnp.zeros((1, *image_shape), jnp.float32)
  if key is None:
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), dummy)
  return jax.jit(functools.partial(model.init, train=False))(key, dummy)


def count_params(params) -> int:
  """Number of trainable parameters (works on arrays and on shape structs)."""
  return sum(int(x.size) for x in jax.tree.leaves(params))


def preset_param_count(name: str, num_classes: int = 10, image_shape: Sequence[int] = (32, 32, 3)) -> int:
  variables = init_variables(create_model(name, num_classes), image_shape)
  return count_params(variables['params'])


def main() -> None:
  for name in PRESETS:
    print(f'{name:24s} {preset_param_count(name):>12,}')


if __name__ == '__main__':
  main()
