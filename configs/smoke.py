"""A tiny model on synthetic data: finishes in seconds on a CPU, with several checkpoints."""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = 'resnet_tiny'
  config.data.source = 'synthetic'
  config.data.synthetic_train_size = 512
  config.data.synthetic_test_size = 200
  config.batch_size = 64
  config.eval_batch_size = 64
  config.num_epochs = 2.0
  config.optim.warmup_epochs = 0.5
  config.optim.learning_rate = 0.05
  config.eval_every_epochs = 1.0
  config.checkpoint_every_steps = 5
  config.keep_checkpoints = 2
  config.log_every_steps = 4
  return config
