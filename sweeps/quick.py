"""The `quick` recipe's regularisation and step size: what a short sweep tunes first.

  python -m resnet_flax.sweep --config=configs/quick.py --space=sweeps/quick.py --workdir=runs/sweep --trials=24 \
      --config.data.path=<unpacked cifar10-jpeg> --config.data.validation_size=5000

Rates and decays span decades, so they are searched on a log scale; label smoothing on a linear one.
"""

from optuna.distributions import FloatDistribution


def get_space():
  return {
    'optim.learning_rate': FloatDistribution(0.05, 3.0, log=True),
    'optim.weight_decay': FloatDistribution(5e-5, 5e-3, log=True),
    'optim.label_smoothing': FloatDistribution(0.0, 0.3),
  }
