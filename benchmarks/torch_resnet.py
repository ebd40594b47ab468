"""A PyTorch reference of the `resnet18`, `resnet34` and `resnet_tiny` presets and of their train step.

Only `benchmarks/throughput.py` uses it, to compare the JAX train step with PyTorch on the same GPU:

  source .carry/setup.sh && python benchmarks/throughput.py

It mirrors `resnet_flax.models` and `resnet_flax.train`: basic blocks, a CIFAR stem (3x3 conv,
stride 1, BN, ReLU), bias-free convolutions, a strided 1x1 conv + BN shortcut where the shape changes,
global average pooling and a dense classifier with bias; BatchNorm momentum 0.1 (PyTorch's momentum
is 1 - flax's 0.9) and epsilon 1e-5; SGD with Nesterov momentum and weight decay (coupled, as in
optax.add_decayed_weights + sgd) on conv and dense kernels only; label-smoothed cross-entropy on
float32 logits; crop (reflect padding) + flip augmentation on the device, inside the step; bfloat16
autocast, channels_last and torch.compile. `create_model` asserts that every preset has exactly the
parameter count of its flax twin.

Differences that remain, none of which changes the work per step much: PyTorch's default
initialisation; symmetric padding of the strided 3x3 convolutions (flax 'SAME' pads 0 before and
1 after); a constant learning rate (the JAX step evaluates its schedule); and the JAX step also
computes accuracy and guards against non-finite updates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

BATCH_NORM_MOMENTUM = 0.1  # = 1 - 0.9, the momentum of resnet_flax.models in flax's convention.
BATCH_NORM_EPSILON = 1e-5

# name: (blocks per stage, widths): as in resnet_flax.models.PRESETS.
SPECS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
  'resnet18': ((2, 2, 2, 2), (32, 64, 128, 256)),
  'resnet34': ((3, 4, 6, 3), (40, 80, 144, 176)),
  'resnet_tiny': ((1, 1, 1), (16, 32, 64)),
}
# Trainable parameters of the flax presets for 10 classes (`python -m resnet_flax.models`).
FLAX_PARAM_COUNTS = {'resnet18': 2_797_610, 'resnet34': 4_348_082, 'resnet_tiny': 78_042}


def _batch_norm(channels: int) -> nn.BatchNorm2d:
  return nn.BatchNorm2d(channels, eps=BATCH_NORM_EPSILON, momentum=BATCH_NORM_MOMENTUM)


class BasicBlock(nn.Module):
  """conv3x3(stride)-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

  def __init__(self, in_channels: int, channels: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, padding=1, bias=False)
    self.norm1 = _batch_norm(channels)
    self.conv2 = nn.Conv2d(channels, channels, 3, 1, padding=1, bias=False)
    self.norm2 = _batch_norm(channels)
    self.shortcut = nn.Identity()
    if in_channels != channels or stride != 1:
      self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False), _batch_norm(channels))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.norm1(self.conv1(x)))
    y = self.norm2(self.conv2(y))
    return F.relu(y + self.shortcut(x))


class ResNet(nn.Module):
  """CIFAR ResNet of basic blocks; the first block of every stage but the first has stride 2."""

  def __init__(self, stage_sizes: Sequence[int], widths: Sequence[int], num_classes: int):
    super().__init__()
    self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, padding=1, bias=False), _batch_norm(widths[0]), nn.ReLU())
    blocks, channels = [], widths[0]
    for stage, (num_blocks, width) in enumerate(zip(stage_sizes, widths, strict=True)):
      for block in range(num_blocks):
        blocks.append(BasicBlock(channels, width, 2 if stage > 0 and block == 0 else 1))
        channels = width
    self.blocks = nn.Sequential(*blocks)
    self.classifier = nn.Linear(channels, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.blocks(self.stem(x))
    return self.classifier(x.mean(dim=(2, 3)))


def count_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters() if p.requires_grad)


def create_model(name: str, num_classes: int = 10) -> ResNet:
  """Preset `name`; with 10 classes its parameter count must equal the flax preset's."""
  model = ResNet(*SPECS[name], num_classes=num_classes)
  if num_classes == 10:
    count, expected = count_params(model), FLAX_PARAM_COUNTS[name]
    assert count == expected, f'PyTorch {name} has {count:,} parameters, the flax preset {expected:,}'
  return model


def create_optimizer(
  model: nn.Module, learning_rate: float, momentum: float, nesterov: bool, weight_decay: float
) -> torch.optim.SGD:
  """SGD with weight decay on conv and dense kernels only (not BatchNorm, not biases), as optim.kernel_mask."""
  kernels = [p for p in model.parameters() if p.ndim > 1]
  others = [p for p in model.parameters() if p.ndim <= 1]
  groups = [{'params': kernels, 'weight_decay': weight_decay}, {'params': others, 'weight_decay': 0.0}]
  fused = next(model.parameters()).is_cuda
  return torch.optim.SGD(groups, lr=learning_rate, momentum=momentum, nesterov=nesterov, fused=fused)


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
  """Index into [0, size) of a position in the reflect-padded axis (numpy's 'reflect': -1 -> 1)."""
  index = index.abs()
  return torch.where(index >= size, 2 * (size - 1) - index, index)


def augment(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, padding: int) -> torch.Tensor:
  """uint8 [B, H, W, C] -> normalized float32 [B, C, H, W] in channels_last memory.

  Each image is cropped at a random offset from its reflect-padded self and mirrored with
  probability 1/2, as augment.augment_batch's 'crop' and 'flip': both are one gather of pixels.
  """
  batch, height, width, _ = images.shape
  device = images.device
  offsets = torch.randint(-padding, padding + 1, (2, batch, 1), device=device)
  rows = _reflect(offsets[0] + torch.arange(height, device=device), height)
  columns = _reflect(offsets[1] + torch.arange(width, device=device), width)
  columns = torch.where(torch.rand(batch, 1, device=device) < 0.5, columns.flip(1), columns)
  crops = images[torch.arange(batch, device=device)[:, None, None], rows[:, :, None], columns[:, None, :]]
  normalized = (crops.float() - mean) / std
  return normalized.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def make_train_step(
  model: nn.Module,
  optimizer: torch.optim.Optimizer,
  *,
  label_smoothing: float,
  pixel_mean: Sequence[float],
  pixel_std: Sequence[float],
  crop_padding: int,
  compile_model: bool = True,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
  """step(uint8 images [B, H, W, C], int64 labels [B]) -> loss: augment, forward, backward, update.

  `pixel_mean` and `pixel_std` are per channel in [0, 1], as augment.channel_stats returns them.
  Augmentation, forward and loss are compiled together; the optimizer is the fused CUDA SGD.
  """
  device = next(model.parameters()).device
  mean = torch.tensor(pixel_mean, device=device) * 255
  std = torch.tensor(pixel_std, device=device) * 255

  def forward_loss(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    inputs = augment(images, mean, std, crop_padding)
    with torch.autocast(device.type, dtype=torch.bfloat16):
      logits = model(inputs)
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)

  compiled_forward_loss = torch.compile(forward_loss) if compile_model else forward_loss

  def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    loss = compiled_forward_loss(images, labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

  return step


def prepare(model: nn.Module, device: torch.device) -> nn.Module:
  """The model on `device`, in channels_last memory and in training mode."""
  return model.to(device, memory_format=torch.channels_last).train()
