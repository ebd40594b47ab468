"""What the model looks at: Grad-CAM and integrated gradients, in JAX, with Adebayo et al.'s sanity check.

Written here, jitted and batched on the device, because the libraries are not usable with these models
(captum and pytorch-grad-cam are PyTorch; PAIR's `saliency` is framework-free but numpy on the host,
one image at a time). The function explained is the one evaluation runs: pixels (uint8, or floats in
[0, 1]) normalised with the run's mean and std inside, BatchNorm in inference mode, float32 (a
bfloat16 run is explained in float32: half-precision gradients would break completeness).

- **Grad-CAM** (Selvaraju et al. 2017) of the last stage: the feature map A that enters global average
  pooling (after the last block; for pre-activation ResNets and DenseNets after the final BN-ReLU),
  read through `models.FEATURES` (`sow` for its value, `perturb` for its gradient, neither stored in
  a checkpoint). The map is ReLU(sum_k alpha_k A_k) with alpha_k the spatial mean of d logit_c / d A_k,
  upsampled (bilinear) to the input size: non-negative, in logit units per feature cell. The ReLU keeps
  the evidence *for* the class; without it the map mixes in the evidence against it
  (pytorch-grad-cam#42). Behind global average pooling and a linear classifier alpha_k is the
  classifier weight / (h w), so this is CAM (Zhou et al. 2016) computed by gradients.
- **Integrated gradients** (Sundararajan et al. 2017) of the class logit F from a baseline x' (a
  black image by default): (x - x') * integral_0^1 grad F(x' + a (x - x')) da, per pixel and channel
  (`Explanation.integrated_gradients` sums the channels). The integral is a Gauss-Legendre quadrature
  whose weights sum to 1: a weighted *mean* of the path gradients, not their sum (the pitfall fixed in
  the authors' code by Integrated-Gradients PR #5). One compiled call takes IG_CHUNK nodes, vmapped;
  the host sums the chunks, so any number of steps runs the same program. Completeness,
  sum(attributions) = F(x) - F(x'), is reported per image as |sum - (F(x) - F(x'))| / |F(x) - F(x')|.
  Along the path a ReLU network's gradient is piecewise constant, so no rule converges fast: on a
  `quick` run (resnet_tiny, CIFAR-10), of 100 random test images 21 / 10 / 7 were above 1% with 64 /
  128 / 256 Gauss-Legendre nodes (trapezoid rule, 65 / 129 / 257 / 1025 nodes: 29 / 11 / 8 / 1). So
  the steps adapt per image: IG_STEPS nodes, doubled for the images still above IG_TOLERANCE, up to
  IG_MAX_STEPS. An image left above it at the cap has F(x) close to F(x') (the relative error is
  ill-conditioned there); `Explanation.steps` says how many nodes each image took.
- **Sanity check** (Adebayo et al. 2018, "Sanity checks for saliency maps"): the classifier and the
  last stage (`last_stage`) are re-initialised (a fresh `init` with another key) and the maps
  recomputed for the same classes; a method that explains the model, not the image, must change:
  `randomization_check` gives the Spearman rank correlation of each image's maps before and after
  (of |IG|, as Adebayo et al.'s "absolute value" variant). On the `quick` run and 64 random CIFAR-10
  test images, five re-initialisations gave Grad-CAM -0.12 to 0.06 and |IG| 0.29 to 0.31: IG keeps
  more of the image itself (its attributions are a product with x - x'). Where one salient object is
  all there is (a toy square on noise), Grad-CAM keeps 0.38 on average: the trained earlier stages
  still find the object.

The compiled explainer (`compile_explain`) serves the Python API's `Model.explain` and `--mode=explain`
(`resnet_flax.explain.command`); both return an `Explanation`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from resnet_flax import data, models
from resnet_flax.errors import ConfigError
from resnet_flax.evaluate import metrics
from resnet_flax.models import trained

IG_STEPS = 64  # Gauss-Legendre nodes of the path integral to start with, ...
IG_MAX_STEPS = 1024  # ... doubled for the images whose completeness error exceeds IG_TOLERANCE, up to this.
IG_TOLERANCE = 0.01
IG_CHUNK = 16  # Path points per vmapped gradient call (memory: IG_CHUNK x batch images at once).
EXPLAIN_BATCH = 16  # Images per compiled call (a power of two; fewer images take the next power of two).

LogitsFn = Callable[[jax.Array], jax.Array]  # Pixels in [0, 1], [N, H, W, C] -> float32 logits [N, K].
# (images [N, H, W, C], targets [N], nodes [IG_CHUNK], weights [IG_CHUNK]) -> weighted gradient sum [N, H, W, C].
GradientsFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]
ClassChoice = int | str | Sequence[int | str] | None


def completeness_error(attributions: np.ndarray, logits: np.ndarray, baseline_logits: np.ndarray) -> np.ndarray:
  """|sum(attributions) - (F(x) - F(x'))| / |F(x) - F(x')| per image, in float64."""
  difference = logits.astype(np.float64) - baseline_logits
  return np.abs(attributions.astype(np.float64).sum(axis=(1, 2, 3)) - difference) / np.abs(difference)


@dataclasses.dataclass(frozen=True)
class Explanation:
  """What an `Explainer` computes for N images of H x W pixels (numpy, on the host)."""

  pixels: np.ndarray  # uint8 [N, H, W, 3]: the images as the model saw them (resized).
  classes: np.ndarray  # int32 [N]: the class explained (the predicted one unless one was given).
  probabilities: np.ndarray  # float32 [N, num_classes].
  grad_cam: np.ndarray  # float32 [N, H, W], >= 0.
  attributions: np.ndarray  # float32 [N, H, W, C]: integrated gradients per pixel and channel.
  logits: np.ndarray  # float32 [N]: F(x), the explained class's logit.
  baseline_logits: np.ndarray  # float32 [N]: F(x') at the baseline.
  steps: np.ndarray  # int [N]: integrated gradients' quadrature nodes for each image.
  baseline: float  # The baseline image's value of every pixel, in [0, 1] (0: black).

  @property
  def predicted(self) -> np.ndarray:
    return self.probabilities.argmax(axis=1)

  @property
  def integrated_gradients(self) -> np.ndarray:
    """float32 [N, H, W]: the attributions summed over the channels (what is shown)."""
    return self.attributions.sum(axis=-1)

  @property
  def completeness_error(self) -> np.ndarray:
    return completeness_error(self.attributions, self.logits, self.baseline_logits)


# The maps, in JAX.


def unit_pixels(images: jax.Array) -> jax.Array:
  """float32 pixels in [0, 1] of uint8 images, or of float images already in [0, 1]."""
  return images.astype(jnp.float32) / 255 if images.dtype == jnp.uint8 else images.astype(jnp.float32)


def class_logits(
  variables: Any, images: jax.Array, *, model: nn.Module, mean: Sequence[float], std: Sequence[float], **apply_kwargs
):
  """The logits of `images` (pixels in [0, 1]) in inference mode, normalised as in training."""
  return models.apply_to_pixels(model.apply, variables, images * 255, mean, std, **apply_kwargs)


def explained_classes(logits: jax.Array, classes: jax.Array) -> jax.Array:
  """`classes`, with the predicted class where it is negative."""
  return jnp.where(classes < 0, jnp.argmax(logits, axis=-1), classes)


def grad_cam(
  variables: Any,
  images: jax.Array,
  classes: jax.Array,
  *,
  model: nn.Module,
  mean: Sequence[float],
  std: Sequence[float],
) -> tuple[jax.Array, jax.Array]:
  """(Grad-CAM maps [N, H, W] of the `classes` (-1: predicted) at the input size, logits [N, K])."""
  apply = functools.partial(class_logits, model=model, mean=mean, std=std, mutable=['intermediates'])
  features = jax.eval_shape(apply, variables, images)[1]['intermediates'][models.FEATURES][0]

  def explained_logit(perturbation):
    logits, state = apply({**variables, 'perturbations': {models.FEATURES: perturbation}}, images)
    targets = explained_classes(jax.lax.stop_gradient(logits), classes)
    chosen = jnp.take_along_axis(logits, targets[:, None], axis=1).sum()  # Examples are independent here.
    return chosen, (logits, state['intermediates'][models.FEATURES][0])

  gradients, (logits, feature_map) = jax.grad(explained_logit, has_aux=True)(jnp.zeros(features.shape, jnp.float32))
  weights = gradients.mean(axis=(1, 2))  # alpha_k of each image: [N, channels].
  maps = nn.relu(jnp.einsum('nhwk,nk->nhw', feature_map, weights))
  return jax.image.resize(maps, images.shape[:3], 'bilinear'), logits


def maps_and_logits(
  variables: Any,
  pixels: jax.Array,
  classes: jax.Array,
  baseline: jax.Array,
  *,
  model: nn.Module,
  mean: Sequence[float],
  std: Sequence[float],
) -> dict[str, jax.Array]:
  """Grad-CAM of `pixels` (uint8 or [0, 1]) for `classes` (-1: predicted), the classes, and the logits
  of the images and of the baseline image that integrated gradients needs."""
  images = unit_pixels(pixels)
  maps, logits = grad_cam(variables, images, classes, model=model, mean=mean, std=std)
  targets = explained_classes(logits, classes)
  baseline_logits = class_logits(variables, jnp.full_like(images, baseline), model=model, mean=mean, std=std)
  chosen = lambda values: jnp.take_along_axis(values, targets[:, None], axis=1)[:, 0]
  return {
    'grad_cam': maps,
    'classes': targets,
    'all_logits': logits,
    'logits': chosen(logits),
    'baseline_logits': chosen(baseline_logits),
  }


def quadrature(steps: int) -> tuple[np.ndarray, np.ndarray]:
  """Gauss-Legendre nodes in [0, 1] and weights summing to 1: the integral over [0, 1] of g is sum w g(a)."""
  nodes, weights = np.polynomial.legendre.leggauss(steps)
  return (nodes + 1) / 2, weights / 2


def path_gradients(
  logits_fn: LogitsFn,
  images: jax.Array,
  targets: jax.Array,
  alphas: jax.Array,
  weights: jax.Array,
  baseline: float | jax.Array,
) -> jax.Array:
  """sum_j weights_j * grad F(x' + alphas_j (x - x')) [N, H, W, C], F the `targets`' logits of `logits_fn`
  and x' the uniform `baseline` image: one chunk of a quadrature, vmapped over its nodes."""
  start = jnp.full_like(images, baseline)

  def target_logits(points):
    return jnp.take_along_axis(logits_fn(points), targets[:, None], axis=1).sum()  # Examples are independent.

  points = start + alphas[:, None, None, None, None] * (images - start)
  return jnp.tensordot(weights, jax.vmap(jax.grad(target_logits))(points), axes=1)


def integrated_gradients(
  gradients_fn: GradientsFn, images: jax.Array, targets: jax.Array, steps: int, baseline: float = 0.0
) -> jax.Array:
  """Attributions [N, H, W, C] of `images` ([0, 1]) by `steps`-node Gauss-Legendre quadrature along the
  straight path from the uniform `baseline` image, IG_CHUNK nodes per call of `gradients_fn` (`path_gradients`
  bound to a model): a compiled chunk serves every number of steps."""
  alphas, weights = quadrature(steps)
  pad = -steps % IG_CHUNK  # Padded nodes weigh 0.
  alphas, weights = (np.pad(a, (0, pad)).reshape(-1, IG_CHUNK).astype(np.float32) for a in (alphas, weights))
  mean_gradient = sum(gradients_fn(images, targets, a, w) for a, w in zip(alphas, weights, strict=True))
  return (images - baseline) * mean_gradient


@dataclasses.dataclass(frozen=True)
class Explainer:
  """A restored model's explanations, compiled (`compile_explain`): call it on images."""

  restored: trained.Restored
  maps: Callable  # `maps_and_logits`, jitted: (variables, pixels, classes, baseline) -> outputs.
  gradients: Callable  # `path_gradients`, jitted: (variables, images, targets, alphas, weights, baseline).

  def __call__(
    self,
    pixels: np.ndarray,
    classes: np.ndarray,
    steps: int | None = None,
    baseline: float = 0.0,
    variables: Any = None,
  ) -> Explanation:
    """The `Explanation` of uint8 `pixels` [N, H, W, 3] for `classes` (int32, -1: predicted), with
    `variables` (default: the restored ones), EXPLAIN_BATCH images per call. Integrated gradients take
    `steps` nodes; None: IG_STEPS, doubled for each image whose completeness error exceeds
    IG_TOLERANCE, up to IG_MAX_STEPS."""
    if (steps is not None and steps < 1) or not 0 <= baseline <= 1:
      raise ValueError(f'integrated gradients need steps >= 1 and a baseline in [0, 1], got {steps} and {baseline}')
    variables = self.restored.variables if variables is None else variables
    batch_size = _padded_size(len(pixels))
    parts = [
      self._explain_batch(
        variables, pixels[start : start + batch_size], classes[start : start + batch_size], steps, baseline
      )
      for start in range(0, len(pixels), batch_size)
    ]
    outputs = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
    return Explanation(
      pixels=pixels,
      classes=outputs['classes'],
      probabilities=np.exp(metrics.log_softmax(outputs['all_logits'])).astype(np.float32),
      grad_cam=outputs['grad_cam'],
      attributions=outputs['attributions'],
      logits=outputs['logits'],
      baseline_logits=outputs['baseline_logits'],
      steps=outputs['steps'],
      baseline=baseline,
    )

  def _explain_batch(
    self, variables: Any, pixels: np.ndarray, classes: np.ndarray, steps: int | None, baseline: float
  ) -> dict[str, np.ndarray]:
    real = len(pixels)
    outputs = jax.device_get(self.maps(variables, _pad(pixels, real), _pad(classes, real), np.float32(baseline)))
    outputs = {k: v[:real] for k, v in outputs.items()}
    images = np.asarray(unit_pixels(pixels))
    outputs['attributions'], outputs['steps'] = np.zeros_like(images), np.zeros(real, np.int64)
    gradients_fn = functools.partial(self.gradients, variables, baseline=np.float32(baseline))
    todo, level = np.arange(real), steps or IG_STEPS
    while len(todo):
      chosen, targets = jnp.asarray(_pad(images[todo], len(todo))), _pad(outputs['classes'][todo], len(todo))
      part = integrated_gradients(gradients_fn, chosen, targets, level, baseline)
      outputs['attributions'][todo], outputs['steps'][todo] = np.asarray(part)[: len(todo)], level
      errors = completeness_error(
        outputs['attributions'][todo], outputs['logits'][todo], outputs['baseline_logits'][todo]
      )
      refine = steps is None and 2 * level <= IG_MAX_STEPS
      todo, level = (todo[errors > IG_TOLERANCE] if refine else todo[:0]), 2 * level
    return outputs


def _padded_size(count: int) -> int:
  """The smallest power of two that holds `count`, up to EXPLAIN_BATCH: few shapes, few compilations."""
  return min(EXPLAIN_BATCH, 1 << max(count - 1, 0).bit_length())


def _pad(values: np.ndarray, count: int) -> np.ndarray:
  """The first axis of `values` (`count` long) zero-padded to `_padded_size(count)`."""
  return np.pad(values, ((0, _padded_size(count) - count),) + ((0, 0),) * (values.ndim - 1))


def compile_explain(restored: trained.Restored) -> Explainer:
  """The `Explainer` of `restored`'s model, in float32 whatever it was trained in."""
  if restored.quantized is not None:
    raise ConfigError(
      f'explanations need the float model, and this one serves in int8 ({restored.quantized.mode}): '
      'explain it with quantize.mode=none (a run trained with quantize.mode=qat always serves in int8)'
    )
  info = restored.run.info
  model_args = dict(model=restored.model.clone(dtype=jnp.float32), mean=info.pixel_mean, std=info.pixel_std)
  gradients = lambda variables, *args, baseline: path_gradients(
    functools.partial(class_logits, variables, **model_args), *args, baseline
  )
  return Explainer(restored, jax.jit(functools.partial(maps_and_logits, **model_args)), jax.jit(gradients))


def class_indices(classes: ClassChoice, class_names: Sequence[str], count: int) -> np.ndarray:
  """int32 [count] model class indices of `classes`: None (-1, the predicted class), one index or name
  for every image, or one per image."""
  if classes is None:
    return np.full(count, -1, np.int32)
  choices = [classes] * count if isinstance(classes, (int, str, np.integer)) else list(classes)
  if len(choices) != count:
    raise ValueError(f'{len(choices)} classes for {count} images: give one class, or one per image')
  indices = []
  for choice in choices:
    position = data.class_index(choice, class_names)
    index = choice if position is None else position
    if isinstance(index, str) or not 0 <= index < len(class_names):
      raise ValueError(f'unknown class {choice!r}: give an index below {len(class_names)} or one of {class_names}')
    indices.append(index)
  return np.array(indices, np.int32)


# The sanity check.


def last_stage(model: nn.Module) -> tuple[str, ...]:
  """Names of the top-level modules of `model`'s last stage: the blocks at the last resolution, and
  the final BatchNorm of pre-activation ResNets and DenseNets."""
  if isinstance(model, models.DenseNet):
    return ('DenseBlock_2', 'final_norm')
  total, last = sum(model.stage_sizes), model.stage_sizes[-1]
  blocks = tuple(f'{model.block_cls.__name__}_{index}' for index in range(total - last, total))
  return blocks + (('final_norm',) if model.block_cls.preactivation else ())


def randomized_variables(restored: trained.Restored, key: jax.Array, names: Sequence[str]) -> dict[str, Any]:
  """`restored`'s variables with the modules `names` (parameters and BatchNorm statistics) as a fresh
  initialisation with `key` draws them."""
  fresh = models.init_variables(restored.model, restored.run.info.image_shape, key)
  sharding = jax.tree.leaves(restored.variables)[0].sharding
  randomized = {}
  for collection, tree in restored.variables.items():
    missing = [name for name in names if collection == 'params' and name not in tree]
    if missing:
      raise ValueError(f'the model has no modules {missing}: models.py renamed them, update explain.last_stage')
    replaced = {name: jax.device_put(fresh[collection][name], sharding) for name in names if name in tree}
    randomized[collection] = {**tree, **replaced}
  return randomized


def rank_correlations(first: np.ndarray, second: np.ndarray) -> np.ndarray:
  """Spearman's rank correlation of each image's pair of maps [N, H, W] (NaN where a map is constant)."""
  return np.array(
    [
      scipy.stats.spearmanr(a.ravel(), b.ravel()).statistic if np.ptp(a) > 0 and np.ptp(b) > 0 else np.nan
      for a, b in zip(first, second, strict=True)
    ]
  )


def randomization_check(
  explainer: Explainer, explanation: Explanation, seed: int = 1, steps: int | None = IG_STEPS
) -> dict[str, Any]:
  """Adebayo et al.'s parameter randomisation test: the maps of `explanation`'s images and classes with
  the classifier and `last_stage` re-initialised (key `seed`), and their rank correlation with the
  originals, per image and averaged over the images where it is defined. The randomised model's
  integrated gradients take `steps` nodes (their ranks hardly depend on the last percent of completeness)."""
  names = (models.HEAD, *last_stage(explainer.restored.model))
  variables = randomized_variables(explainer.restored, jax.random.key(seed), names)
  randomized = explainer(explanation.pixels, explanation.classes, steps, explanation.baseline, variables)
  grad_cam_correlations = rank_correlations(explanation.grad_cam, randomized.grad_cam)
  ig_correlations = rank_correlations(np.abs(explanation.integrated_gradients), np.abs(randomized.integrated_gradients))
  return {
    'reinitialized': list(names),
    'seed': seed,
    'grad_cam_rank_correlation': _mean_or_none(grad_cam_correlations),
    'integrated_gradients_rank_correlation': _mean_or_none(ig_correlations),
    'grad_cam_undefined': int(np.isnan(grad_cam_correlations).sum()),  # A constant (all-zero) map has no ranks.
    'per_image_grad_cam': grad_cam_correlations,
    'per_image_integrated_gradients': ig_correlations,
  }


def _mean_or_none(values: np.ndarray) -> float | None:
  return None if np.all(np.isnan(values)) else float(np.nanmean(values))
