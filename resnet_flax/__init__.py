"""resnet_flax: compact ResNets on CIFAR and image folders in JAX/Flax.

`resnet_flax.load(workdir)` returns a trained run's model (`resnet_flax.deploy.api`).
"""

from __future__ import annotations

from typing import Any


def load(workdir: str, checkpoint: str | int = 'best', **kwargs: Any):
  """The model of the trained run in `workdir`: see `resnet_flax.deploy.api.load`."""
  from resnet_flax.deploy import api  # Imported on use: `import resnet_flax` stays cheap, and free of cycles.

  return api.load(workdir, checkpoint, **kwargs)
