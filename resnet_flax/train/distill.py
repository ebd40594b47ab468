"""Knowledge distillation: a student trains on the softened outputs of a frozen teacher run.

With `distill.teacher=<workdir or checkpoint directory>` the student's loss is

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * cross_entropy

(Hinton et al. 2015), the KL a batch mean of per-example divergences in float32, and the cross-entropy
the project's own (label smoothing, class weights, mixed targets). The defaults, alpha = 0.9 and
T = 4, are the KD baseline of CRD on CIFAR (Tian et al. 2020, "Contrastive Representation
Distillation": resnet56 -> resnet20 on CIFAR-100, 69.06% from labels, 70.66% distilled).

The teacher is restored as evaluation restores a run (`finetune.restore_run`: the weights evaluation
uses, its EMA when it kept one; a QAT-trained teacher runs as its float model) and is frozen: it runs in inference mode (BatchNorm running
statistics, no dropout) on the very batch the student sees, after augmentation and mixup/CutMix,
inside the same jitted step, once per step and outside the differentiated loss (SAM neither
recomputes nor differentiates it): big_vision's "consistent" teaching (Beyer et al. 2022). Its
weights enter that step as an argument, replicated and never donated. The pitfalls this avoids: a
missing T^2, which shrinks the soft gradients by 1/T^2 (keras-io#869); a teacher left in training
mode; teacher outputs cached ahead of time, misaligned once the data is shuffled or augmented.

Teacher and student may be different architectures, but they must share the class names (matched by
name, `data.class_indices`: the teacher's outputs are reordered to the student's) and the image size. The teacher keeps its own normalisation: the student's normalised batch is mapped
back to pixels and normalised with the teacher's statistics. run.json records the teacher ({'path',
'step'}) in the resume fingerprint, so a resume with another teacher, or another step of it, is refused.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from resnet_flax import models, step_extensions
from resnet_flax.data import ImageData, class_indices
from resnet_flax.errors import ConfigError
from resnet_flax.models import trained
from resnet_flax.train import finetune

TeacherLogitsFn = Callable[[Any, jax.Array], jax.Array]  # (teacher variables, student's batch) -> logits.


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A trained run that a student learns from."""

  path: str  # Its workdir.
  restored: trained.Restored  # Its model, run.json, checkpoint step and the weights evaluation uses.
  class_order: tuple[int, ...] | None = None  # Its output of each of the student's classes; None: the same order.

  @property
  def variables(self) -> dict[str, Any]:
    return self.restored.variables

  @property
  def identity(self) -> dict[str, Any]:
    """run.json's record of the teacher: a resumed run must find the same one."""
    return {'path': self.path, 'step': self.restored.step}

  def logits_fn(self, student_mean: Sequence[float], student_std: Sequence[float]) -> TeacherLogitsFn:
    """`teacher_logits` of this teacher, for a student that normalises with `student_mean`/`student_std`."""
    info = self.restored.run.info
    return functools.partial(
      teacher_logits,
      model=self.restored.model,
      student_stats=(tuple(student_mean), tuple(student_std)),
      teacher_stats=(tuple(info.pixel_mean), tuple(info.pixel_std)),
      class_order=self.class_order,
    )


def load_teacher(config: ml_collections.ConfigDict, train_split: ImageData) -> Teacher | None:
  """The teacher `config.distill.teacher` names, checked against the student's data; None without one."""
  if not config.distill.teacher:
    return None
  path, restored = finetune.restore_run(
    config.distill.teacher, config.distill.teacher_checkpoint, 'distill.teacher', config
  )
  info, image_shape = restored.run.info, tuple(train_split.images.shape[1:])
  refuse = f'--config.distill.teacher={config.distill.teacher!r}'
  if sorted(info.class_names) != sorted(train_split.class_names):
    raise ConfigError(
      f'{refuse} was trained on the classes {list(info.class_names)}, this run has '
      f'{list(train_split.class_names)}: distil from a teacher of the same classes (in any order)'
    )
  if tuple(info.image_shape) != image_shape:
    raise ConfigError(
      f'{refuse} was trained on {"x".join(map(str, info.image_shape))} images, this run has '
      f"{'x'.join(map(str, image_shape))}: set --config.data.image_size to the teacher's"
    )
  logging.info(
    'Distilling from %s, step %d (%s, its %s), alpha %g, temperature %g',
    path,
    restored.step,
    restored.run.config.model.name,
    'EMA of the weights' if restored.run.config.ema_decay > 0 else 'weights',
    config.distill.alpha,
    config.distill.temperature,
  )
  order = tuple(class_indices(train_split.class_names, info.class_names).tolist())
  return Teacher(path, restored, None if order == tuple(range(len(order))) else order)


def _check_unused(distill_config: ml_collections.ConfigDict) -> None:
  """Without a teacher the other distill fields do nothing: one set to another value is a mistake."""
  from configs import default  # The values that do nothing.

  for name, inert in default.get_config().distill.items():
    if distill_config[name] != inert:
      raise ConfigError(
        f'--config.distill.{name}={distill_config[name]!r} does nothing without distill.teacher: '
        f'set --config.distill.teacher=<a trained run> or leave it at {inert!r}'
      )


def teacher_logits(
  variables: Any,
  images: jax.Array,
  *,
  model: nn.Module,
  student_stats: tuple[Sequence[float], Sequence[float]],
  teacher_stats: tuple[Sequence[float], Sequence[float]],
  class_order: tuple[int, ...] | None = None,
) -> jax.Array:
  """The frozen teacher's float32 logits of the student's normalised batch `images`, in inference mode.

  The teacher sees the same pixels as the student, normalised with its own (mean, std): the mapping is
  affine per channel, so it commutes with mixup and CutMix, and a Cutout hole stays the same colour.
  """
  if teacher_stats == student_stats:
    logits = model.apply(variables, images, train=False)
  else:
    mean, std = student_stats
    pixels = images * (jnp.asarray(std, jnp.float32) * 255) + jnp.asarray(mean, jnp.float32) * 255
    logits = models.apply_to_pixels(model.apply, variables, pixels, *teacher_stats)
  if class_order is not None:  # The teacher's outputs in the student's order of the classes (`Teacher.class_order`).
    logits = logits[:, jnp.asarray(class_order)]
  return jax.lax.stop_gradient(logits.astype(jnp.float32))


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> jax.Array:
  """T^2 times the batch mean of KL(softmax(teacher / T) || softmax(student / T)), in float32.

  The T^2 keeps the soft targets' gradients (which scale as 1/T^2) on the scale of the cross-entropy's.
  """
  log_student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature)
  log_teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature)
  return temperature**2 * optax.losses.kl_divergence_with_log_targets(log_student, log_teacher).mean()


def loss_arguments(distill_config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """alpha, 1 - alpha and T as `student_loss` takes them. 1 - alpha is computed on the host in float64, as it
  was of a Python constant: float32's own 1 - alpha rounds to another number."""
  alpha, temperature = distill_config.alpha, distill_config.temperature
  return {'alpha': np.float32(alpha), 'one_minus_alpha': np.float32(1 - alpha), 'temperature': np.float32(temperature)}


def student_loss(
  cross_entropy: jax.Array, student_logits: jax.Array, teacher_logits: jax.Array, args: dict[str, jax.Array]
) -> jax.Array:
  """alpha * `distillation_loss` + (1 - alpha) * `cross_entropy` (the batch mean of the project's loss);
  `args` of `loss_arguments`."""
  soft = distillation_loss(student_logits, teacher_logits, args['temperature'])
  return args['alpha'] * soft + args['one_minus_alpha'] * cross_entropy


@step_extensions.register
class Distillation(step_extensions.StepExtension):
  """The step extension: the teacher's logits of the clean batch before the loss (`prepare`), the student's
  loss in place of the cross-entropy (`loss`); its weights, alpha and T enter the step as arguments."""

  name = 'distill'
  traced_fields = ('distill.alpha', 'distill.temperature')

  def __init__(self, teacher: Teacher, distill_config: ml_collections.ConfigDict):
    self.teacher, self.distill_config = teacher, distill_config

  @classmethod
  def check_config(cls, config: ml_collections.ConfigDict) -> None:
    if not config.distill.teacher:
      _check_unused(config.distill)

  @classmethod
  def create(cls, config: ml_collections.ConfigDict, train_split: ImageData, steps: Any) -> Distillation | None:
    teacher = load_teacher(config, train_split)
    return None if teacher is None else cls(teacher, config.distill)

  def run_record(self) -> dict[str, Any]:
    return {'teacher': self.teacher.identity}

  def fingerprint(self) -> Any:
    """The teacher's identity, model, normalisation and class order: what its logits in the step come from."""
    info = self.teacher.restored.run.info
    stats = (tuple(info.pixel_mean), tuple(info.pixel_std))
    return (super().fingerprint(), self.teacher.restored.model, stats, self.teacher.class_order)

  def arguments(self) -> dict[str, Any]:
    return {'variables': self.teacher.variables, **loss_arguments(self.distill_config)}

  def prepare(self, args, context: step_extensions.StepContext, batch: step_extensions.Batch):
    # Once per step, outside the differentiated loss: SAM neither recomputes nor differentiates the teacher.
    return batch, self.teacher.logits_fn(context.mean, context.std)(args['variables'], batch.images)

  def loss(self, args, context, teacher_logits: jax.Array, loss: step_extensions.Loss) -> step_extensions.Loss:
    return loss._replace(value=student_loss(loss.value, loss.logits, teacher_logits, args))
