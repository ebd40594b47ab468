"""AugMix with its Jensen-Shannon consistency loss (Hendrycks et al. 2020) on `configs/quick.py`'s small net.

Crop and flip make the clean image; the loss adds two AugMix views of it (width 3, depth 1..3, severity 3,
the ops that do not overlap CIFAR-10-C) and 12 x JSD(clean, view 1, view 2) to the clean cross-entropy.
Three forward passes a step: about 3x the step time of quick.py. No label smoothing (the paper has none).

  python main.py --config=configs/augmix.py --workdir=runs/augmix \
      --config.data.path=<unpacked cifar10-jpeg>
"""

from configs import quick

JSD_WEIGHT = 12.0  # The paper's.


def add_augmix(config):
  """The fields that turn AugMix and its loss on; the tests apply them to the smoke config."""
  config.augment.train_ops = ('crop', 'flip')  # The clean image; the views are made by the loss.
  config.augment.augmix_width = 3
  config.augment.augmix_depth = -1
  config.augment.augmix_severity = 3
  config.augment.augmix_alpha = 1.0
  config.augmix.jsd_weight = JSD_WEIGHT
  config.optim.label_smoothing = 0.0
  return config


def get_config():
  return add_augmix(quick.get_config())
