"""The rules of the compression config fields (`prune.*`, `quantize.*`); their cross-field checks are
`prune.check_config` and `quantize.check_config`."""

from __future__ import annotations

from resnet_flax import config_fields as rules
from resnet_flax.compress import prune, quantize

CONFIG_RULES: dict[str, rules.Rule] = {
  'prune.sparsity': rules.fraction,
  'prune.start_fraction': rules.fraction,
  'prune.end_fraction': rules.probability,
  'prune.every_steps': rules.positive,
  'prune.scope': rules.choice(prune.SCOPES),
  'quantize.mode': rules.choice(quantize.MODES),
  'quantize.stem': rules.BOOLEAN,
  'quantize.classifier': rules.BOOLEAN,
}
