"""The strongest recipe under 5M parameters: WRN-22-4 (4.3M), TrivialAugment + Cutout, SAM, EMA.

WRN-22-4 with Cutout is a published 96.5% CIFAR-10 recipe at 4.3M parameters; to it we add
TrivialAugment (wide), SAM (rho 0.05), an EMA of the weights, label smoothing, and test-time
augmentation at evaluation (`--mode=evaluate`, `eval.tta=flip+translate`). 200 epochs at batch 256.
Not yet measured on a GPU: the README's results table holds measured rows only.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = 'wrn22_4'
  config.augment.train_ops = ('crop', 'flip', 'trivialaugment', 'cutout')
  config.augment.cutout_size = 16
  config.optim.name = 'sam'
  config.optim.sam_rho = 0.05
  config.optim.learning_rate = 0.1
  config.optim.weight_decay = 5e-4
  config.optim.label_smoothing = 0.1
  config.optim.warmup_epochs = 5.0
  config.batch_size = 256
  config.num_epochs = 200.0
  config.ema_decay = 0.999
  config.half_precision = True
  config.eval.tta = 'flip+translate'
  config.eval_every_epochs = 5.0
  config.checkpoint_every_steps = 2000
  return config
