"""The rules of the robustness config fields: the evaluation's attacks (`eval.attacks`, ...) and corruptions
(`eval.corruptions`, ...), and adversarial training (`adversarial.*`, whose cross-field checks are
`adversarial.check_config`)."""

from __future__ import annotations

from resnet_flax import config_fields as rules
from resnet_flax.errors import ConfigError
from resnet_flax.robust import attacks, corruptions


def _attacks(v) -> str | None:
  if not isinstance(v, (tuple, list)) or not all(isinstance(name, str) for name in v):
    return "must be a tuple of attack names, e.g. \"('pgd20', 'apgd_ce')\""
  try:
    [attacks.parse(name) for name in v]
  except ConfigError as e:
    return str(e).removeprefix('eval.attacks: ')
  repeated = sorted({name for name in v if list(v).count(name) > 1})
  return f'{", ".join(repeated)} named more than once' if repeated else None


def _fractions_of_epsilon(v) -> str | None:
  ok = isinstance(v, (tuple, list)) and all(rules.is_number(f) and f > 0 for f in v)
  return None if ok else 'must be a tuple of positive multiples of eval.epsilon, e.g. (0.5, 2.0), or ()'


CONFIG_RULES: dict[str, rules.Rule] = {
  'eval.attacks': _attacks,
  'eval.epsilon': rules.non_negative,
  'eval.attack_norm': rules.choice(attacks.NORMS),
  'eval.attack_examples': rules.whole_number,
  'eval.epsilon_curve': _fractions_of_epsilon,
  'eval.corruptions': corruptions.check_names,
  'eval.corruption_examples': rules.whole_number,
  'eval.corruption_seed': rules.whole_number,
  'adversarial.epsilon': rules.non_negative,
  'adversarial.step_size': rules.non_negative,
  'adversarial.steps': rules.positive,
  'adversarial.trades_beta': rules.non_negative,
  'adversarial.guard_drop': rules.probability,
}
