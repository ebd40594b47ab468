"""`configs/resnet34.py` on CIFAR-100 (100 classes: the classifier grows, the budget still holds)."""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = 'resnet34'
  config.data.name = 'cifar100'
  return config
