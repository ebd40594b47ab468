"""Compact ResNets, wide ResNets and DenseNets in Flax linen, and the registry of named presets.

`apply_to_pixels` is how any model sees pixels in inference mode (evaluation, attacks, explanations,
export): normalised as in training, by the run's mean and std.

`python -m resnet_flax.models` prints every preset with its trainable parameter count.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from resnet_flax import config_fields as rules
from resnet_flax.data import augment
from resnet_flax.models import layers

ModuleDef = Any

BATCH_NORM_MOMENTUM = 0.9  # The recipes' value; flax defaults to 0.99.
BATCH_NORM_EPSILON = 1e-5
HEAD = 'Dense_0'  # The classifier of every model: the `nn.Dense` of `_classify`, named by flax.
STEM = 'stem_conv'  # The first convolution of every model (`ResNet._stem`, `DenseNet`).
# The last stage's feature map, where it enters global average pooling (`_classify`): explanations read it.
FEATURES = 'features'


def _conv_and_norm(dtype: Any, train: bool, dirac_init: bool = False) -> tuple[ModuleDef, ModuleDef]:
  """Bias-free SAME convolutions and BatchNorm that compute in `dtype` and keep float32 parameters."""
  conv = functools.partial(nn.Conv, use_bias=False, dtype=dtype, padding='SAME')
  if dirac_init:
    conv = functools.partial(conv, kernel_init=layers.dirac())
  norm = functools.partial(
    nn.BatchNorm, use_running_average=not train, momentum=BATCH_NORM_MOMENTUM, epsilon=BATCH_NORM_EPSILON, dtype=dtype
  )
  return conv, norm


def _classify(module: nn.Module, x, num_classes: int, dropout: nn.Module, dtype: Any):
  """Global average pooling, dropout and a linear classifier of `module`; the logits are float32.

  The pooled feature map `x` is sown into 'intermediates' and may be perturbed by 'perturbations'
  (`FEATURES`), which Grad-CAM reads its value and gradient from (`explain`). Neither is ever created by
  `init` (a checkpoint holds the same variables), and both are no-ops unless an `apply` asks for them.
  """
  if not module.is_initializing():
    x = module.perturb(FEATURES, x)
  module.sow('intermediates', FEATURES, x)
  x = dropout(jnp.mean(x, axis=(1, 2)))
  return nn.Dense(num_classes, dtype=dtype)(x).astype(jnp.float32)


def _shortcut(x, channels: int, strides: int, conv: ModuleDef, norm: ModuleDef | None = None, projected=None):
  """`x` where the shape is kept, else a strided 1x1 projection (then BN when `norm` is given) of
  `projected`, which defaults to `x`: pre-activation blocks project their pre-activated input."""
  if x.shape[-1] == channels and strides == 1:
    return x
  y = conv(channels, (1, 1), strides, name='shortcut_conv')(x if projected is None else projected)
  return y if norm is None else norm(name='shortcut_norm')(y)


class _Block(nn.Module):
  """The fields and residual-branch ending that every residual block shares."""

  preactivation: ClassVar[bool] = False  # Whether the block normalises its input (see `ResNet`).

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  dropout: ModuleDef  # nn.Dropout with `deterministic` bound, as `norm` has `use_running_average`.
  strides: int = 1
  se_ratio: float = 0.0
  dropout_rate: float = 0.0  # Before the branch's last conv: between the 3x3s (Zagoruyko & Komodakis 2016).
  drop_path_rate: float = 0.0  # Probability of dropping the residual branch (stochastic depth).
  zero_init_residual: bool = False  # Zero-init the branch's last layer: the block starts as identity.

  def _end_branch(self, y):
    """Squeeze-excitation, then stochastic depth (Huang et al. 2016, "Deep networks with stochastic
    depth"): in training each example's branch is dropped with probability `drop_path_rate` and kept
    ones are scaled by 1 / (1 - rate), so evaluation uses the branch as it is."""
    if self.se_ratio:
      y = layers.SqueezeExcite(self.se_ratio, dtype=y.dtype)(y)
    return self.dropout(self.drop_path_rate, broadcast_dims=(1, 2, 3), name='drop_path')(y)

  def _add_post_activation(self, x, y):
    """The last BN of a post-activation branch, its end, the shortcut (projected with BN) and a ReLU."""
    y = self.norm(scale_init=nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones)(y)
    y = self._end_branch(y)
    return nn.relu(y + _shortcut(x, y.shape[-1], self.strides, self.conv, self.norm))


class ResNetBlock(_Block):
  """Basic block (He et al. 2016, "Deep residual learning"): two 3x3 convolutions, each followed by BN."""

  @nn.compact
  def __call__(self, x):
    y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), self.strides)(x)))
    y = self.conv(self.filters, (3, 3))(self.dropout(self.dropout_rate)(y))
    return self._add_post_activation(x, y)


class BottleneckResNetBlock(_Block):
  """Bottleneck block (He et al. 2016): 1x1 reduce, 3x3, 1x1 expand to 4x `filters`."""

  expansion: int = 4

  @nn.compact
  def __call__(self, x):
    y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x)))
    y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), self.strides)(y)))
    y = self.conv(self.filters * self.expansion, (1, 1))(self.dropout(self.dropout_rate)(y))
    return self._add_post_activation(x, y)


class PreActBlock(_Block):
  """Pre-activation basic block (He et al. 2016, "Identity mappings in deep residual networks"):
  BN-ReLU-conv3x3 twice, added to the block's un-normalised input. A projection shortcut takes the
  pre-activated input, as in the wide ResNet code; `zero_init_residual` zeroes the last conv."""

  preactivation: ClassVar[bool] = True

  @nn.compact
  def __call__(self, x):
    activated = nn.relu(self.norm()(x))
    y = self.conv(self.filters, (3, 3), self.strides)(activated)
    y = nn.relu(self.norm()(y))
    last_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.lecun_normal()
    y = self.conv(self.filters, (3, 3), kernel_init=last_init)(self.dropout(self.dropout_rate)(y))
    y = self._end_branch(y)
    return y + _shortcut(x, self.filters, self.strides, self.conv, projected=activated)


class ResNet(nn.Module):
  """ResNet with a CIFAR stem (3x3, stride 1), an ImageNet stem (7x7 stride 2 + max-pool), or a
  whitening stem (a frozen 2x2 `PatchWhitening`, then the CIFAR stem).

  With post-activation blocks the stem ends in BN-ReLU; with pre-activation blocks (`PreActBlock`) the
  CIFAR stem is a bare conv and a final BN-ReLU precedes pooling (He et al. 2016, "Identity mappings").
  Stochastic depth drops block l of L with probability `drop_path_rate` * l / L (Huang et al. 2016).
  """

  stage_sizes: Sequence[int]
  block_cls: type[_Block]
  widths: Sequence[int]
  num_classes: int
  stem: str = 'cifar'
  stem_width: int | None = None  # Defaults to widths[0].
  dropout_rate: float = 0.0  # Before the classifier.
  block_dropout_rate: float = 0.0  # Inside each block, before its last conv (as in wide ResNets).
  se_ratio: float = 0.0
  zero_init_residual: bool = False
  drop_path_rate: float = 0.0  # Of the last block; earlier ones get linearly less.
  dirac_init: bool = False  # Convolutions start as identities on their first channels (`dirac`).
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv, norm = _conv_and_norm(self.dtype, train, self.dirac_init)
    dropout = functools.partial(nn.Dropout, deterministic=not train)
    x = self._stem(x.astype(self.dtype), conv, norm)
    blocks = [
      (width, 2 if stage > 0 and block == 0 else 1)
      for stage, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.widths, strict=True))
      for block in range(num_blocks)
    ]
    for index, (width, strides) in enumerate(blocks):
      x = self.block_cls(
        width,
        conv=conv,
        norm=norm,
        dropout=dropout,
        strides=strides,
        se_ratio=self.se_ratio,
        dropout_rate=self.block_dropout_rate,
        drop_path_rate=self.drop_path_rate * (index + 1) / len(blocks),
        zero_init_residual=self.zero_init_residual,
      )(x)
    if self.block_cls.preactivation:
      x = nn.relu(norm(name='final_norm')(x))
    return _classify(self, x, self.num_classes, dropout(self.dropout_rate), self.dtype)

  def _stem(self, x, conv, norm):
    width = self.stem_width or self.widths[0]
    if self.stem == 'whiten':
      x = layers.PatchWhitening(dtype=self.dtype, name=layers.WHITENING)(x)
    if self.stem in ('cifar', 'whiten'):
      x = conv(width, (3, 3), name='stem_conv')(x)
      return x if self.block_cls.preactivation else nn.relu(norm(name='stem_norm')(x))
    if self.stem == 'imagenet':
      x = nn.relu(norm(name='stem_norm')(conv(width, (7, 7), (2, 2), name='stem_conv')(x)))
      return nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    raise ValueError(f"unknown stem {self.stem!r}; use 'cifar', 'whiten' or 'imagenet'")


def wide_resnet(depth: int, widen_factor: int) -> functools.partial:
  """WRN-`depth`-`widen_factor` (Zagoruyko & Komodakis 2016, "Wide residual networks"): a 16-channel
  stem, then 3 stages of (depth - 4) / 6 pre-activation basic blocks of widths 16k, 32k, 64k."""
  blocks_per_stage, remainder = divmod(depth - 4, 6)
  if remainder:
    raise ValueError(f'a wide ResNet has depth 6n + 4, not {depth}')
  return functools.partial(
    ResNet,
    stage_sizes=(blocks_per_stage,) * 3,
    block_cls=PreActBlock,
    widths=tuple(width * widen_factor for width in (16, 32, 64)),
    stem_width=16,
  )


class DenseBlock(nn.Module):
  """`num_layers` DenseNet-BC bottleneck layers, BN-ReLU-conv1x1 (4k) then BN-ReLU-conv3x3 (k),
  each concatenating its k new channels to all the previous ones."""

  num_layers: int
  growth_rate: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    for _ in range(self.num_layers):
      y = self.conv(4 * self.growth_rate, (1, 1))(nn.relu(self.norm()(x)))
      y = self.conv(self.growth_rate, (3, 3))(nn.relu(self.norm()(y)))
      x = jnp.concatenate([x, y], axis=-1)
    return x


class Transition(nn.Module):
  """DenseNet transition: BN-ReLU-conv1x1 to `channels`, then 2x2 average pooling."""

  channels: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    x = self.conv(self.channels, (1, 1))(nn.relu(self.norm()(x)))
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class DenseNet(nn.Module):
  """DenseNet-BC for CIFAR (Huang et al. 2017, "Densely connected convolutional networks"): a 3x3 stem
  of 2k channels, 3 dense blocks of (depth - 4) / 6 bottleneck layers with growth rate k, transitions
  that compress the channels by `compression`, and BN-ReLU before pooling."""

  depth: int
  growth_rate: int
  num_classes: int
  compression: float = 0.5
  dropout_rate: float = 0.0  # Before the classifier.
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    layers_per_block, remainder = divmod(self.depth - 4, 6)
    if remainder:
      raise ValueError(f'a DenseNet-BC has depth 6n + 4, not {self.depth}')
    conv, norm = _conv_and_norm(self.dtype, train)
    x = conv(2 * self.growth_rate, (3, 3), name='stem_conv')(x.astype(self.dtype))
    for block in range(3):
      if block:
        x = Transition(int(x.shape[-1] * self.compression), conv, norm)(x)
      x = DenseBlock(layers_per_block, self.growth_rate, conv, norm)(x)
    x = nn.relu(norm(name='final_norm')(x))
    return _classify(self, x, self.num_classes, nn.Dropout(self.dropout_rate, deterministic=not train), self.dtype)


PRESETS: dict[str, functools.partial] = {
  'resnet18': functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=ResNetBlock, widths=(32, 64, 128, 256)),
  'resnet26': functools.partial(ResNet, stage_sizes=(3, 3, 3, 3), block_cls=ResNetBlock, widths=(32, 64, 128, 256)),
  'resnet34': functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=ResNetBlock, widths=(40, 80, 144, 176)),
  'resnet50': functools.partial(
    ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckResNetBlock, widths=(24, 48, 96, 192)
  ),
  'resnet18_imagenet_stem': functools.partial(
    ResNet, stage_sizes=(2, 2, 2, 2), block_cls=ResNetBlock, widths=(64, 128, 256, 512), stem='imagenet'
  ),
  'se_resnet18': functools.partial(
    ResNet, stage_sizes=(2, 2, 2, 2), block_cls=ResNetBlock, widths=(32, 64, 128, 256), se_ratio=0.25
  ),
  'preact_resnet18': functools.partial(
    ResNet, stage_sizes=(2, 2, 2, 2), block_cls=PreActBlock, widths=(32, 64, 128, 256)
  ),
  # The wide ResNets' counts in the literature: WRN-16-4 2.7M and WRN-40-2 2.2M (Zagoruyko &
  # Komodakis 2016), WRN-28-2 1.5M (Oliver et al. 2018), WRN-22-4 4.3M.
  'wrn16_4': wide_resnet(16, 4),
  'wrn22_4': wide_resnet(22, 4),
  'wrn28_2': wide_resnet(28, 2),
  'wrn40_2': wide_resnet(40, 2),
  'se_wrn16_4': functools.partial(wide_resnet(16, 4), se_ratio=0.25),
  # Huang et al. 2017 report 0.8M for DenseNet-BC (L=100, k=12); their larger ones exceed 5M.
  'densenet_bc100_k12': functools.partial(DenseNet, depth=100, growth_rate=12),
  # Not in the paper: its depth with twice the growth rate, wider for accelerators.
  'densenet_bc100_k24': functools.partial(DenseNet, depth=100, growth_rate=24),
  # A tiny net for smoke tests and quick CPU runs.
  'resnet_tiny': functools.partial(ResNet, stage_sizes=(1, 1, 1), block_cls=ResNetBlock, widths=(16, 32, 64)),
}

# Options off by default (0, False or '': the preset's own) everywhere; an architecture without one
# still accepts it off.
SWITCHABLE_OPTIONS = (
  'dropout_rate',
  'block_dropout_rate',
  'se_ratio',
  'zero_init_residual',
  'drop_path_rate',
  'dirac_init',
  'stem',
)
STEMS = ('cifar', 'whiten', 'imagenet')


DTYPES = ('float32', 'bfloat16')  # `model.dtype`.

CONFIG_RULES: dict[str, rules.Rule] = {
  'model.name': rules.choice(PRESETS),  # The registry itself: a model added later is valid.
  'model.max_params': rules.positive,
  'model.dtype': rules.choice(DTYPES),
  'model.dropout_rate': rules.fraction,
  'model.block_dropout_rate': rules.fraction,
  'model.se_ratio': rules.non_negative,
  'model.drop_path_rate': rules.fraction,
  'model.stem': rules.choice(('', *STEMS)),
  'model.dirac_init': rules.BOOLEAN,
}


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
  """Builds preset `name`; `kwargs` override its fields (dtype, dropout_rate, se_ratio, ...).

  A switchable option left off (0 or False) is dropped: every architecture defaults to off, a preset's own
  setting stands (se_resnet18 keeps its SE gates with se_ratio=0), and an architecture without the option
  (DenseNet has no se_ratio) accepts it; switching such an option on there is an error.
  """
  if name not in PRESETS:
    raise ValueError(f'unknown model.name {name!r}; choose one of {sorted(PRESETS)}')
  preset = PRESETS[name]
  options = {key: value for key, value in kwargs.items() if value or key not in SWITCHABLE_OPTIONS}
  fields = {field.name for field in dataclasses.fields(preset.func)}
  unsupported = sorted(set(options).intersection(SWITCHABLE_OPTIONS) - fields)
  if unsupported:
    raise ValueError(
      f"model.name {name!r} ({preset.func.__name__}) has no option {', '.join(unsupported)}; leave it at 0/False/''"
    )
  return preset(num_classes=num_classes, **options)


def compute_dtype(config: ml_collections.ConfigDict) -> jnp.dtype:
  return jnp.bfloat16 if config.half_precision or config.model.dtype == 'bfloat16' else jnp.float32


def create_model_from_config(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  """`create_model` for `config.model`, computing in `compute_dtype(config)`."""
  options = {name: config.model[name] for name in SWITCHABLE_OPTIONS}
  return create_model(config.model.name, num_classes, dtype=compute_dtype(config), **options)


FULL_RESOLUTION_STEMS = ('cifar', 'whiten')  # 3x3 stride 1: the first stage sees the input at its full size.
LARGE_IMAGE = 96  # From this side on a full-resolution stem costs (side / 32)^2 = 9x CIFAR's, or more.


def full_resolution_stem(config: ml_collections.ConfigDict) -> bool:
  """Whether the model's first stage sees the images at their full size (the CIFAR or whitening stem), which
  `model.stem=imagenet` would change; False for an architecture without the option."""
  preset = PRESETS[config.model.name]
  if 'stem' not in {field.name for field in dataclasses.fields(preset.func)}:
    return False
  return (config.model.stem or preset.keywords.get('stem', 'cifar')) in FULL_RESOLUTION_STEMS


def stem_cost_note(config: ml_collections.ConfigDict, image_side: int) -> str | None:
  """What the preset's CIFAR stem costs on `image_side`-pixel images and the field that changes it; None where
  the stem was chosen (`model.stem`), downsamples, or the images are small."""
  if config.model.stem or image_side < LARGE_IMAGE or not full_resolution_stem(config):
    return None
  return (
    f'{config.model.name} keeps its CIFAR stem (3x3, stride 1) on {image_side}x{image_side} images: its first stage '
    f'runs at full resolution, about {(image_side / 32) ** 2:.0f}x the compute and activation memory of 32x32 CIFAR. '
    '--config.model.stem=imagenet (7x7 stride 2 and a max-pool: 16x fewer pixels after it) is the usual choice '
    'for photos (configs/photos.py)'
  )


@functools.partial(jax.jit, static_argnums=0)
def _init(model: nn.Module, key: jax.Array, images: jax.Array) -> Any:
  """`model.init`, compiled once per equal model (modules compare by their fields) and input shape: the seeds of
  a recipe share it, as they share the train step."""
  return model.init(key, images, train=False)


def init_variables(model: nn.Module, image_shape: Sequence[int], key: jax.Array | None = None):
  """Initial {'params', 'batch_stats'}; with no key only their shapes (nothing is computed)."""
  dummy = jnp.zeros((1, *image_shape), jnp.float32)
  if key is None:
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), dummy)
  return _init(model, key, dummy)


def apply_to_pixels(
  apply_fn: Callable, variables: Any, pixels: jax.Array, mean: Sequence[float], std: Sequence[float], **apply_kwargs
) -> Any:
  """`apply_fn`'s output (the logits) in inference mode on `pixels` [N, H, W, C] on the 0..255 scale (uint8,
  or float: pass `pixels * 255` for pixels in [0, 1]), normalised by the run's `mean` and `std` as in training.
  `apply_kwargs` (mutable=, ...) go to `apply_fn`."""
  return apply_fn(variables, augment.normalize(pixels, mean, std), train=False, **apply_kwargs)


def count_params(params) -> int:
  """Number of trainable parameters (works on arrays and on shape structs)."""
  return sum(int(x.size) for x in jax.tree.leaves(params))


def preset_param_count(name: str, num_classes: int = 10, image_shape: Sequence[int] = (32, 32, 3)) -> int:
  variables = init_variables(create_model(name, num_classes), image_shape)
  return count_params(variables['params'])
