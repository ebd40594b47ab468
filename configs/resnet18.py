"""The `resnet18` preset with the default CIFAR-10 recipe (SGD-Nesterov, warmup + cosine, crop + flip)."""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = 'resnet18'
  return config
