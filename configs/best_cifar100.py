"""`configs/best.py` on CIFAR-100."""

from configs import best


def get_config():
  config = best.get_config()
  config.data.name = 'cifar100'
  return config
