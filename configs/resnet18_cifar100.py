"""`configs/resnet18.py` on CIFAR-100."""

from configs import resnet18


def get_config():
  config = resnet18.get_config()
  config.data.name = 'cifar100'
  return config
