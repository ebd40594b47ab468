"""The values a run may change without changing the compiled train step: its traced hyperparameters.

The seed, the peak learning rate, weight decay, momentum, label smoothing and the nonzero mixup/CutMix
alphas enter the step as one argument of float32/int32 scalars (`of`), so runs that differ only in them
(seeds, sweep trials, a suite's rates) share one program, and a persistent compilation cache serves a
second process. They stay out of `opt_state`: the optimizer is rebuilt from them inside the step (not
`optax.inject_hyperparams`, whose state would change the checkpointed tree). An alpha of 0 is `None`
here: mixing off is another program, and a `None` leaf gives jit another tree, so another cache entry.

What the step closes over is `static_config`: the config with these fields set to None, so arithmetic on one
of them by mistake fails while tracing instead of fixing every later run to the first run's value (a truth
test would not fail: read the values from the step's `hparams`, never from the static config).
The step extensions' values (ε, distillation's α and T...) are traced too, as their `arguments`, and their
`traced_fields` are left out of the static config as well.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from resnet_flax import config_fields, step_extensions

# Config field -> its dtype in the step. `seed` keys every random draw of the step (`jax.random.key`).
TRACED: dict[str, type] = {
  'seed': np.int32,
  'optim.learning_rate': np.float32,
  'optim.weight_decay': np.float32,
  'optim.momentum': np.float32,
  'optim.label_smoothing': np.float32,
  'augment.mixup_alpha': np.float32,
  'augment.cutmix_alpha': np.float32,
}
OFF_AT_ZERO = ('augment.mixup_alpha', 'augment.cutmix_alpha')  # 0 turns these off: None, another program.

Hyperparams = dict[str, Any]  # Last part of each TRACED field -> a NumPy scalar (None: off), as the step takes it.


def of(config: ml_collections.ConfigDict) -> Hyperparams:
  """The traced hyperparameters of `config`, by the last part of their field name."""
  values = {}
  for field, dtype in TRACED.items():
    value = config_fields.get(config, field)
    off = field in OFF_AT_ZERO and not value
    values[field.rsplit('.', 1)[-1]] = None if off else dtype(value)
  return values


def static_config(config: ml_collections.ConfigDict) -> ml_collections.FrozenConfigDict:
  """`config` without its traced fields and the registered step extensions' (None in their place), frozen:
  hashable, it keys the compiled step."""
  static = ml_collections.ConfigDict(config.to_dict())
  extension_fields = (field for extension in step_extensions.REGISTRY.values() for field in extension.traced_fields)
  for field in (*TRACED, *extension_fields):
    parent, _, name = field.rpartition('.')
    section = config_fields.get(static, parent) if parent else static
    if name in section:  # An extension's field a config may lack.
      section[name] = None
  return ml_collections.FrozenConfigDict(static)
