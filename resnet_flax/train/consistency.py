"""AugMix's Jensen-Shannon consistency loss (Hendrycks et al. 2020), as a step extension.

With `augmix.jsd_weight` > 0 each step trains on the clean batch (what `augment.train_ops` made, e.g.
crop + flip) and on two AugMix views of each of its images (`data.augmix.augment_and_mix`, arguments
from the `augment.augmix_*` fields), all three in ONE forward pass of the concatenated batch, as the
paper's code does, so BatchNorm's statistics are those of the mixture. The loss is

    CE(clean) + jsd_weight * (KL(p_clean || M) + KL(p_1 || M) + KL(p_2 || M)) / 3,   M = clip(mean p, 1e-7, 1)

each KL a batch mean, as the paper's `F.kl_div(log M, p, reduction='batchmean')`. Three forward (and
backward) passes a step: about three times the step time. The weight is an argument of the compiled
step, so one program serves every weight; the training accuracy is the clean images'.

How the hooks carry it: `prepare` maps the normalised clean batch back to uint8 pixels (exact when the
train ops keep whole pixel values, as crop and flip do; a Cutout fill is rounded), makes the two views
from a stream of its own folded from the step's key (`VIEWS_STREAM`) and each example's position in the
global batch, so a resumed run draws the same views, and hands the step the concatenation with
all-zero targets for the views: the step's cross-entropy, the batch mean over 3B examples, is then
CE(clean) / 3. `loss` splits the logits and adds the JSD. The zero targets are why label smoothing is
refused here (it would give the views a target); class weights weigh them 0 anyway.

AugMix in `augment.train_ops` alone is AugMix without the loss (one forward pass). With the loss on, the
clean image must stay clean, so `check_config` refuses 'augmix' in train_ops; it refuses mixup/CutMix,
a frozen backbone, adversarial training and distillation too, each with one line saying what to change.

Written by hand: no maintained JAX library does AugMix or its consistency loss.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resnet_flax import step_extensions
from resnet_flax.data import augment, augmix
from resnet_flax.errors import ConfigError

VIEWS = 2  # AugMix views per image, besides the clean one (the paper's).
VIEWS_STREAM = 2**32 - 3  # fold_in data of the views' key; attacks take 2**32 - 2, alternating flips 2**32 - 1.
MIXTURE_FLOOR = 1e-7  # The paper's clamp of the mixture distribution before its log.


def jensen_shannon(logits: list[jax.Array]) -> jax.Array:
  """The batch mean of (1/n) sum_i KL(p_i || M) over the n distributions softmax(logits[i]), in float32,
  M their mean clipped to [1e-7, 1] (the paper's code)."""
  log_probabilities = [jax.nn.log_softmax(x.astype(jnp.float32)) for x in logits]
  mixture = sum(jnp.exp(log_p) for log_p in log_probabilities) / len(logits)
  log_mixture = jnp.log(jnp.clip(mixture, MIXTURE_FLOOR, 1))
  divergences = [jnp.sum(jnp.exp(log_p) * (log_p - log_mixture), axis=-1).mean() for log_p in log_probabilities]
  return sum(divergences) / len(logits)


def to_pixels(images: jax.Array, mean: Any, std: Any) -> jax.Array:
  """Normalised images -> uint8 pixels, rounded: the inverse of `augment.normalize` on whole pixel values."""
  pixels = images * (jnp.asarray(std, jnp.float32) * 255) + jnp.asarray(mean, jnp.float32) * 255
  return jnp.clip(jnp.round(pixels), 0, 255).astype(jnp.uint8)


def augmix_views(key: jax.Array, pixels: jax.Array, arguments: dict[str, Any]) -> list[jax.Array]:
  """VIEWS AugMix views of uint8 [B, H, W, C] `pixels`, float32 pixel values; view v of example i draws from
  fold_in(fold_in(key, v), i)."""
  mix = lambda example_key, image: augmix.augment_and_mix(example_key, image, **arguments)
  batch_size = pixels.shape[0]
  return [
    jax.vmap(mix)(augment.example_keys(jax.random.fold_in(key, view), batch_size), pixels) for view in range(VIEWS)
  ]


def _refusals(config: ml_collections.ConfigDict) -> list[tuple[bool, str]]:
  """(contradiction, what to change) for a config with the loss on."""
  train_ops = tuple(config.augment.train_ops)
  return [
    (
      any(str(op).split('(')[0].strip() == 'augmix' for op in train_ops),
      f"remove 'augmix' from --config.augment.train_ops={train_ops!r}: the loss makes its two AugMix views "
      'itself and trains on the clean image too (or set augmix.jsd_weight=0 for AugMix without the loss)',
    ),
    (
      bool(config.augment.mixup_alpha or config.augment.cutmix_alpha),
      'set --config.augment.mixup_alpha=0 and --config.augment.cutmix_alpha=0: the views are of single images',
    ),
    (config.optim.freeze == 'backbone', 'set --config.optim.freeze=none: a linear probe has no features to train'),
    (
      bool(config.optim.label_smoothing),
      'set --config.optim.label_smoothing=0: the views carry zero targets, which smoothing would change',
    ),
    (config.adversarial.method != 'none', 'set --config.adversarial.method=none: one extra loss at a time'),
    (bool(config.distill.teacher), 'set --config.distill.teacher=: one extra loss at a time'),
  ]


@step_extensions.register
class AugMixConsistency(step_extensions.StepExtension):
  """The step extension: the two AugMix views beside the clean batch (`prepare`), the JSD added (`loss`)."""

  name = 'augmix_jsd'
  traced_fields = ('augmix.jsd_weight',)  # Through `arguments`: one compiled step serves every weight.

  def __init__(self, weight: float, augmix_arguments: dict[str, Any]):
    self.weight, self.augmix_arguments = weight, augmix_arguments

  @classmethod
  def check_config(cls, config: ml_collections.ConfigDict) -> None:
    weight = config.augmix.jsd_weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
      raise ConfigError(f'--config.augmix.jsd_weight={weight!r} is invalid: must be >= 0 (0 turns the loss off)')
    if not weight:
      return
    for contradicts, change in _refusals(config):
      if contradicts:
        raise ConfigError(f'--config.augmix.jsd_weight={weight} (AugMix consistency loss): {change}')
    try:
      augment.op_arguments('augmix', config.augment)
    except ValueError as e:
      raise ConfigError(f'--config.augmix.jsd_weight={weight}: {e}') from None

  @classmethod
  def create(cls, config: ml_collections.ConfigDict, train_split: Any, steps: Any) -> AugMixConsistency | None:
    if not config.augmix.jsd_weight:
      return None
    return cls(config.augmix.jsd_weight, augment.op_arguments('augmix', config.augment))

  def arguments(self) -> dict[str, np.ndarray]:
    return {'weight': np.float32(self.weight)}

  def prepare(self, args, context: step_extensions.StepContext, batch: step_extensions.Batch):
    key = jax.random.fold_in(context.key, VIEWS_STREAM)
    views = augmix_views(key, to_pixels(batch.images, context.mean, context.std), self.augmix_arguments)
    images = [batch.images, *(augment.normalize(view, context.mean, context.std) for view in views)]
    targets = [batch.targets, *(jnp.zeros_like(batch.targets) for _ in views)]
    return step_extensions.Batch(jnp.concatenate(images), jnp.concatenate(targets)), None

  def loss(self, args, context, aux: None, loss: step_extensions.Loss) -> step_extensions.Loss:
    logits = jnp.split(loss.logits, 1 + VIEWS)
    clean_cross_entropy = (1 + VIEWS) * loss.value  # The views' zero targets add nothing to the step's batch mean.
    return loss._replace(value=clean_cross_entropy + args['weight'] * jensen_shannon(logits), logits=logits[0])
