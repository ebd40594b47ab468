"""Mixup and CutMix: targets that sum to 1 and weigh the pixels each image really contributes."""

import functools

import jax
import numpy as np
import pytest

from resnet_flax.data import mixing

BATCH, SIDE = 16, 8


@functools.cache
def _mix_fn(**kwargs):
  """mix_batch under jit, with the alphas as constants, an alpha of 0 off (None) as `train.hyperparams` makes it."""
  kwargs = {name: None if name.endswith('_alpha') and not value else value for name, value in kwargs.items()}
  return jax.jit(functools.partial(mixing.mix_batch, **kwargs))


def _mix(images, labels, key, **kwargs):
  images, targets = _mix_fn(**kwargs)(images, labels, jax.random.key(key))
  return np.asarray(images), np.asarray(targets)


def _labelled_batch():
  """Example i has label i (num_classes = BATCH), so target row i names example i's partner."""
  images = np.random.default_rng(0).normal(size=(BATCH, SIDE, SIDE, 3)).astype(np.float32)
  return images, np.arange(BATCH)


def _lam_and_partners(targets: np.ndarray) -> tuple[float, np.ndarray]:
  """The batch's lambda (the weight of each example's own label) and each example's partner."""
  own = np.diag(targets)
  mixed = own < 1
  assert mixed.any(), 'no example was mixed'
  lam = own[mixed][0]
  np.testing.assert_allclose(own[mixed], lam, rtol=1e-6)
  others = targets * (1 - np.eye(BATCH))
  partners = np.where(mixed, others.argmax(axis=1), np.arange(BATCH))
  assert len(set(partners)) == BATCH, 'the partners are not a permutation of the batch'
  return float(lam), partners


@pytest.mark.parametrize('alphas', [(1.0, 0.0), (0.0, 1.0), (0.2, 1.0)])
def test_targets_are_distributions_over_own_and_partner_label(alphas):
  images, labels = _labelled_batch()
  for key in range(5):
    _, targets = _mix(images, labels, key, num_classes=BATCH, mixup_alpha=alphas[0], cutmix_alpha=alphas[1])
    assert targets.shape == (BATCH, BATCH) and targets.dtype == np.float32
    np.testing.assert_allclose(targets.sum(axis=1), 1, rtol=1e-6)
    assert np.all(targets >= 0) and np.all((targets > 0).sum(axis=1) <= 2)


def test_mixup_images_are_the_convex_combination_with_the_targets_lambda():
  images, labels = _labelled_batch()
  for key in range(5):
    mixed, targets = _mix(images, labels, key, num_classes=BATCH, mixup_alpha=0.4, cutmix_alpha=0.0)
    lam, partners = _lam_and_partners(targets)
    np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[partners], rtol=1e-5, atol=1e-6)


def test_cutmix_targets_equal_the_pasted_pixel_area():
  """Example i is filled with the value i: the pixels of value partner(i) are the pasted box."""
  images = np.broadcast_to(np.arange(BATCH, dtype=np.float32)[:, None, None, None], (BATCH, SIDE, SIDE, 3))
  labels = np.arange(BATCH)
  areas = []
  for key in range(40):
    mixed, targets = _mix(images, labels, key, num_classes=BATCH, mixup_alpha=0.0, cutmix_alpha=1.0)
    assert np.array_equal(mixed.min(axis=-1), mixed.max(axis=-1)), 'a pixel was pasted in some channels only'
    for i in range(BATCH):
      from_partner = (mixed[i, :, :, 0] != i).mean()
      np.testing.assert_allclose(targets[i, i], 1 - from_partner, atol=1e-6)
      if from_partner:
        partner = int(mixed[i][mixed[i] != i][0])
        np.testing.assert_allclose(targets[i, partner], from_partner, atol=1e-6)
    areas.append(1 - targets[0, 0] if targets[0, 0] < 1 else 0.0)
  # lam ~ Beta(1, 1) is uniform, so the mean pasted area is about 1/2 less what the borders clip.
  assert 0.2 < np.mean(areas) < 0.6, np.mean(areas)
  assert len(set(np.round(areas, 6))) > 10, 'the box hardly varies'


def test_cutmix_box_area_is_one_minus_lambda_where_no_border_clips_it():
  """Beta(1000, 1000) puts lambda within 0.05 of 1/2: an unclipped box covers about half the image."""
  side = 32
  images = np.broadcast_to(np.arange(BATCH, dtype=np.float32)[:, None, None, None], (BATCH, side, side, 3))
  areas = []
  for key in range(20):
    mixed, targets = _mix(images, np.arange(BATCH), key, num_classes=BATCH, mixup_alpha=0.0, cutmix_alpha=1000.0)
    areas.append((mixed[..., 0] != np.arange(BATCH)[:, None, None]).any(axis=0).mean())
  assert 0.42 <= max(areas) <= 0.55, max(areas)


def test_cutmix_box_is_one_rectangle_shared_by_the_batch():
  images = np.broadcast_to(np.arange(BATCH, dtype=np.float32)[:, None, None, None], (BATCH, SIDE, SIDE, 3))
  for key in range(10):
    mixed, _ = _mix(images, np.arange(BATCH), key, num_classes=BATCH, mixup_alpha=0.0, cutmix_alpha=1.0)
    pasted = mixed[..., 0] != np.arange(BATCH)[:, None, None]
    box = pasted.any(axis=0)  # An example paired with itself shows no pasted pixels.
    assert all(np.array_equal(p, box) for p in pasted if p.any()), 'examples got different boxes'
    rows, cols = np.flatnonzero(box.any(axis=1)), np.flatnonzero(box.any(axis=0))
    assert box.sum() == len(rows) * len(cols), 'the pasted pixels are not one rectangle'


def test_both_alphas_choose_mixup_or_cutmix_half_the_time():
  images, labels = _labelled_batch()
  trials, cutmix = 300, 0
  for key in range(trials):
    mixed, _ = _mix(images, labels, key, num_classes=BATCH, mixup_alpha=1.0, cutmix_alpha=1.0)
    cutmix += np.isin(mixed, images).all()  # Mixup's blends of random floats are no input value.
  assert abs(cutmix - trials / 2) < 4 * np.sqrt(trials / 4), cutmix


def test_no_mixing_when_both_alphas_are_zero_or_prob_is_zero():
  images, labels = _labelled_batch()
  for alphas, prob in (((0.0, 0.0), 1.0), ((1.0, 1.0), 0.0)):
    mixed, targets = _mix(
      images, labels, 0, num_classes=BATCH, mixup_alpha=alphas[0], cutmix_alpha=alphas[1], prob=prob
    )
    np.testing.assert_array_equal(mixed, images)
    np.testing.assert_array_equal(targets, np.eye(BATCH, dtype=np.float32))


def test_prob_mixes_that_fraction_of_batches_and_same_key_same_result():
  images, labels = _labelled_batch()
  kwargs = dict(num_classes=BATCH, mixup_alpha=1.0, cutmix_alpha=0.0, prob=0.3)
  trials = 300
  mixed_batches = sum(not np.array_equal(_mix(images, labels, k, **kwargs)[0], images) for k in range(trials))
  assert abs(mixed_batches - 0.3 * trials) < 4 * np.sqrt(trials * 0.3 * 0.7), mixed_batches
  first, again = (_mix(images, labels, 7, **kwargs) for _ in range(2))
  np.testing.assert_array_equal(first[0], again[0])
  np.testing.assert_array_equal(first[1], again[1])
