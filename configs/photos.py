"""A folder of your own photos, of any sizes: `resnet18` with the ImageNet stem at 128x128.

    python main.py --config=configs/photos.py:/path/to/photos --workdir=runs/photos

The folder is `<root>/{train,test}/<class>/*.jpg` (and optionally `val/`), as `data.source=folder` reads it
(the path after the colon sets `data.path`). Why these values:
- 128x128: every image is resized to its shorter side, then centre-cropped (`data.resize`), at decode.
- the ImageNet stem (7x7 stride 2 and a max-pool): the first stage runs at 32x32, as a CIFAR model's does; the
  preset's CIFAR stem at 128 px costs 16x its compute and activation memory.
- batch 64: a few photo folders hold hundreds of images; a smaller batch still makes several steps an epoch.
- 30 epochs, a warmup of 1: a short warmup fits a small split, and many epochs make up for its few steps.
- crop with 16 pixels of padding (an eighth of the side, as 4 of CIFAR's 32) and flip.
"""

from configs import default


def get_config(path: str = ''):
  config = default.get_config()
  config.model.name = 'resnet18'
  config.model.stem = 'imagenet'
  config.data.source = 'folder'
  config.data.path = path
  config.data.image_size = 128
  config.batch_size = 64
  config.eval_batch_size = 64
  config.num_epochs = 30.0
  config.optim.warmup_epochs = 1.0
  config.augment.crop_padding = 16
  return config
