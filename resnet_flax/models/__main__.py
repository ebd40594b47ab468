"""`python -m resnet_flax.models`: every preset with its trainable parameter count (CIFAR-10, 32x32)."""

from resnet_flax import models


def main() -> None:
  for name in models.PRESETS:
    print(f'{name:24s} {models.preset_param_count(name):>12,}')


if __name__ == '__main__':
  main()
