"""The rules of the data's config fields (`data.*`, `augment.*`, `eval.tta`), from the registries of this
package: sources, pipelines, samplings, resize policies, augmentation ops and TTA views."""

from __future__ import annotations

import ml_collections

from resnet_flax import config_fields as rules
from resnet_flax import data
from resnet_flax.data import augment, augmix, images, input_pipeline, policies
from resnet_flax.errors import ConfigError


def _image_size(v) -> str | None:
  return None if isinstance(v, int) and v >= 0 else "must be 0 (the data's own size) or a size in pixels"


def _magnitude(v) -> str | None:
  top = policies.NUM_LEVELS - 1
  return None if rules.is_number(v) and 0 <= v <= top else f'must be in [0, {top}]'


CONFIG_RULES: dict[str, rules.Rule] = {
  'data.source': rules.choice(sorted(data.SOURCES)),
  'data.download': rules.BOOLEAN,
  'data.pipeline': rules.choice(sorted(input_pipeline.PIPELINES)),
  'data.sampling': rules.choice(input_pipeline.SAMPLINGS),
  'data.train_examples': rules.non_negative,
  'data.validation_size': rules.non_negative,
  'data.image_size': _image_size,
  'data.resize': rules.choice(images.RESIZE_POLICIES),
  'augment.crop_padding': rules.non_negative,
  'augment.pad_mode': rules.choice(augment.PAD_MODES),
  'augment.alternating_flip': rules.BOOLEAN,
  'augment.cutout_size': rules.non_negative,
  'augment.randaugment_num_ops': rules.non_negative,
  'augment.randaugment_magnitude': _magnitude,
  'augment.augmix_width': augmix.check_width,
  'augment.augmix_depth': augmix.check_depth,
  'augment.augmix_severity': augmix.check_severity,
  'augment.augmix_alpha': augmix.check_alpha,
  'augment.mixup_alpha': rules.non_negative,
  'augment.cutmix_alpha': rules.non_negative,
  'augment.mix_prob': rules.probability,
  'eval.tta': rules.choice(augment.TTA_VIEWS),
}


def check_config(config: ml_collections.ConfigDict) -> None:
  """The augmentation ops of `augment.train_ops`, checked against the op registry."""
  try:
    augment.check_ops(config.augment)
  except ValueError as e:
    raise ConfigError(f'--config.augment.train_ops={config.augment.train_ops!r} is invalid: {e}') from None
