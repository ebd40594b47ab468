"""A small net that learns real CIFAR-10 to >= 60% test accuracy in under 10 minutes on 2 CPU cores.

  python main.py --config=configs/quick.py --workdir=runs/quick \
      --config.data.source=folder --config.data.path=<unpacked cifar10-jpeg>
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = 'resnet_tiny'
  config.data.source = 'folder'
  config.batch_size = 256
  config.num_epochs = 3.0
  config.optim.learning_rate = 0.4
  config.optim.warmup_epochs = 0.5
  config.optim.weight_decay = 5e-4
  config.optim.label_smoothing = 0.1
  config.eval_every_epochs = 1.0
  config.checkpoint_every_steps = 200
  config.log_every_steps = 50
  return config
