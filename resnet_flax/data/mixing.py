"""Mixup and CutMix on a normalized float batch: soft targets from integer labels, inside the jitted step.

Both pair example i with example partner[i], a permutation of the batch drawn from the key, and
draw one lambda ~ Beta(alpha, alpha) per batch (as timm's default 'batch' mode):
  mixup   (Zhang et al., 2018) images lam * x + (1 - lam) * x[partner];
  cutmix  (Yun et al., 2019) a box of area fraction about 1 - lam, centred uniformly and clipped at
          the borders, is pasted from x[partner]; lam is then recomputed from the pasted area, so
          the targets weigh each image by the pixels it really contributes.
Targets are lam * one_hot(y) + (1 - lam) * one_hot(y[partner]). Everything is a pure function of the
key, so a resumed run mixes exactly like an uninterrupted one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Alpha = float | jax.Array | None  # None turns the mixer off (another program); a value may be traced.


def _mixup(key: jax.Array, images: jax.Array, partners: jax.Array, alpha: Alpha) -> tuple[jax.Array, jax.Array]:
  lam = jax.random.beta(key, alpha, alpha)
  return (lam * images + (1 - lam) * partners).astype(images.dtype), lam


def _cutmix_box(key: jax.Array, height: int, width: int, area: jax.Array) -> jax.Array:
  """[H, W] mask of a box of sides int(side * sqrt(area)) centred uniformly, clipped to the image.

  The box covers rows [cy - h // 2, cy - h // 2 + h), like Cutout's square, so before clipping its
  area is h * w, as close to `area` as whole pixels allow.
  """
  box_height = (height * jnp.sqrt(area)).astype(jnp.int32)
  box_width = (width * jnp.sqrt(area)).astype(jnp.int32)
  centre_y, centre_x = jax.random.randint(key, (2,), 0, jnp.array([height, width]))
  top, left = centre_y - box_height // 2, centre_x - box_width // 2
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  return (rows >= top) & (rows < top + box_height) & (cols >= left) & (cols < left + box_width)


def _cutmix(key: jax.Array, images: jax.Array, partners: jax.Array, alpha: Alpha) -> tuple[jax.Array, jax.Array]:
  lam_key, box_key = jax.random.split(key)
  lam = jax.random.beta(lam_key, alpha, alpha)
  box = _cutmix_box(box_key, images.shape[1], images.shape[2], 1 - lam)
  return jnp.where(box[:, :, None], partners, images), 1 - box.mean()


def mix_batch(
  images: jax.Array,
  labels: jax.Array,
  key: jax.Array,
  *,
  num_classes: int,
  mixup_alpha: Alpha,
  cutmix_alpha: Alpha,
  prob: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
  """Float [B, H, W, C] images and int [B] labels -> (mixed images, float32 targets [B, num_classes]).

  With both alphas on (not None) each batch uses mixup or CutMix with probability 1/2; with one on, that
  one; with both None the images pass through and the targets are one-hot. `prob` is the chance that a
  batch is mixed at all. Which alphas are on and `prob` choose the program; the alphas' values may be
  traced (`train.hyperparams`: 0 there is None here).
  """
  targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  pairs = ((_mixup, mixup_alpha), (_cutmix, cutmix_alpha))
  mixers = [(mixer, alpha) for mixer, alpha in pairs if alpha is not None]
  if not mixers:
    return images, targets
  partner_key, choice_key, mix_key, apply_key = jax.random.split(key, 4)
  partner = jax.random.permutation(partner_key, images.shape[0])
  branches = [lambda k, x, p, mixer=mixer, alpha=alpha: mixer(k, x, p, alpha) for mixer, alpha in mixers]
  choice = jax.random.randint(choice_key, (), 0, len(branches))
  mixed, lam = jax.lax.switch(choice, branches, mix_key, images, images[partner])
  applied = jax.random.bernoulli(apply_key, prob)
  lam = jnp.where(applied, lam, 1.0)
  return jnp.where(applied, mixed, images), lam * targets + (1 - lam) * targets[partner]
