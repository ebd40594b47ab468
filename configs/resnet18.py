"""`resnet18` (2,797,610 parameters: the source projects' ResNet-18 at half width) with the standard CIFAR-10 recipe.

The recipe is configs/default.py's: 200 epochs at batch 512; SGD with Nesterov momentum 0.9, peak
learning rate 0.1 after 2 warmup epochs, cosine decay to 0; weight decay 5e-4 on conv and dense
kernels; random crop (4 pixels of reflect padding) and flip. tests/test_recipes.py holds it to this.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = 'resnet18'
  return config
