"""Knowledge distillation (`distill.teacher`): the loss, the frozen teacher, a student nearer its teacher than
plain training's, run.json's record of it.

The teacher is the shared smoke run (`straight_run`: resnet_tiny, 10 synthetic classes, 32x32
images, 48 steps); the students train in-process for one epoch (8 steps) of the same data.
"""

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy.special import log_softmax

from configs import smoke
from resnet_flax import data, models
from resnet_flax.data import augment
from resnet_flax.errors import ConfigError
from resnet_flax.run.workdir import RUN_FILE, RunInfo, check_resumable
from resnet_flax.train import config_checks, distill, trainer

from helpers import finished_steps, load_checkpoint, restore_smoke_run, run_main, tiny_run_info

STEPS = 8  # One epoch of the smoke config.
# The students' rate: at the smoke config's 0.05, T = 4 distillation overshoots in a short run (the logits' spread
# grows to 2.3x the teacher's by step 8) and its KL to the teacher stays above plain training's until ~32 steps
# (measured: 3.08 vs 1.02 at step 8, 0.070 vs 0.059 at 24, 0.0021 vs 0.0038 at 32); at 0.01 it is below from step 8.
STUDENT_LEARNING_RATE = 0.01
HEAD_KERNEL = f"['params']['{models.HEAD}']['kernel']"  # A leaf path of `leaves`.


def student_config(teacher='', **fields) -> ml_collections.ConfigDict:
  """The smoke config for one epoch, distilled from `teacher`; `fields` are dotted config fields."""
  config = smoke.get_config()
  config.num_epochs, config.distill.teacher = 1.0, str(teacher)
  config.optim.learning_rate = STUDENT_LEARNING_RATE
  config.update_from_flattened_dict(fields)
  return config


def leaves(tree) -> dict:
  """{path: array} of every leaf of `tree`: a checkpoint, or variables."""
  return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def file_digests(directory) -> dict[str, str]:
  files = (path for path in directory.rglob('*') if path.is_file())
  return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest() for path in files}


def softmax(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def logits_on_test_images(workdir) -> np.ndarray:
  """The float64 logits of the smoke data's test images by a run's final weights."""
  restored, split = restore_smoke_run(workdir)
  info = restored.run.info
  logits = models.apply_to_pixels(
    restored.model.apply, restored.variables, split.images, info.pixel_mean, info.pixel_std
  )
  return np.asarray(logits, np.float64)


# The loss.


@pytest.mark.parametrize('temperature', [1.0, 4.0])
def test_distillation_loss_is_t_squared_times_the_batch_mean_kl(temperature):
  rng = np.random.default_rng(0)
  student, teacher = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
  p_student, p_teacher = softmax(student / temperature), softmax(teacher / temperature)
  kl = np.sum(p_teacher * (np.log(p_teacher) - np.log(p_student)), axis=-1)  # KL(teacher || student), per example.

  loss = distill.distillation_loss(jnp.asarray(student), jnp.asarray(teacher), temperature)
  np.testing.assert_allclose(loss, temperature**2 * kl.mean(), rtol=1e-5)
  assert distill.distillation_loss(jnp.asarray(student, jnp.bfloat16), teacher, temperature).dtype == jnp.float32


def test_the_gradient_pulls_the_student_toward_the_teacher():
  rng = np.random.default_rng(1)
  student, teacher = jnp.asarray(rng.normal(size=(2, 4, 6)).astype(np.float32) * 2)
  temperature = 4.0
  loss_and_grad = jax.value_and_grad(distill.distillation_loss)

  loss, grad = loss_and_grad(teacher, teacher, temperature)  # A student equal to its teacher has nothing to learn.
  assert float(loss) == pytest.approx(0.0, abs=1e-6)
  np.testing.assert_allclose(grad, 0.0, atol=1e-7)
  # d/ds T^2 KL(softmax(t/T) || softmax(s/T)) = T (softmax(s/T) - softmax(t/T)), per example of the mean.
  _, grad = loss_and_grad(student, teacher, temperature)
  expected = temperature * (softmax(np.asarray(student) / temperature) - softmax(np.asarray(teacher) / temperature))
  np.testing.assert_allclose(grad, expected / len(student), rtol=1e-4, atol=1e-7)


def test_student_loss_blends_the_soft_and_the_hard_loss():
  rng = np.random.default_rng(2)
  student, teacher = jnp.asarray(rng.normal(size=(2, 3, 5)).astype(np.float32))
  cross_entropy = jnp.float32(1.7)
  soft = distill.distillation_loss(student, teacher, 2.0)
  arguments = lambda alpha: distill.loss_arguments(config_of(alpha=alpha, temperature=2.0))
  blend = lambda alpha: distill.student_loss(cross_entropy, student, teacher, arguments(alpha))
  np.testing.assert_allclose(blend(0.25), 0.25 * soft + 0.75 * cross_entropy, rtol=1e-6)
  assert blend(0.0) == cross_entropy and blend(1.0) == soft


def config_of(**fields) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(fields)


class Pixels(nn.Module):
  """A stand-in teacher whose logits are its input, flattened; only in inference mode."""

  @nn.compact
  def __call__(self, x, train: bool):
    assert not train, 'the teacher must run in inference mode'
    return x.reshape(x.shape[0], -1).astype(jnp.bfloat16)


def test_the_teacher_sees_the_students_pixels_normalised_its_own_way():
  pixels = np.random.default_rng(3).integers(0, 256, (2, 4, 4, 3)).astype(np.uint8)
  student_stats, teacher_stats = ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3)), ((0.45, 0.45, 0.45), (0.25, 0.25, 0.25))
  images = augment.normalize(pixels, *student_stats)

  logits = distill.teacher_logits({}, images, model=Pixels(), student_stats=student_stats, teacher_stats=teacher_stats)
  assert logits.dtype == jnp.float32
  expected = augment.normalize(pixels, *teacher_stats).reshape(2, -1)
  np.testing.assert_allclose(logits, expected, atol=2e-2)  # The bfloat16 logits' rounding.
  same = distill.teacher_logits({}, images, model=Pixels(), student_stats=student_stats, teacher_stats=student_stats)
  np.testing.assert_array_equal(same, images.reshape(2, -1).astype(jnp.bfloat16).astype(jnp.float32))


def test_the_teachers_outputs_follow_the_students_order_of_the_classes():
  pixels = np.random.default_rng(4).integers(0, 256, (2, 1, 1, 3)).astype(np.uint8)
  stats = ((0.5,) * 3, (0.25,) * 3)
  images = augment.normalize(pixels, *stats)
  teacher = lambda order: distill.teacher_logits(
    {}, images, model=Pixels(), student_stats=stats, teacher_stats=stats, class_order=order
  )
  np.testing.assert_array_equal(teacher((2, 0, 1)), teacher(None)[:, [2, 0, 1]])


# Training with a teacher.


class Trained(NamedTuple):
  workdirs: dict[str, Path]  # plain (no teacher), alpha0 and distilled (alpha 0.9), from `straight_run`.
  teacher_files: dict[str, str]  # The teacher's checkpoint files (their digests) before the runs.
  teachers: list[distill.Teacher]  # The teachers the runs loaded, with the arrays their steps took.


@pytest.fixture(scope='module')
def trained(straight_run, tmp_path_factory) -> Trained:
  """Runs of one epoch, without a teacher and with `straight_run` as the teacher at alpha 0 and 0.9."""
  teacher_files = file_digests(straight_run / 'checkpoints')
  teachers, load_teacher = [], distill.load_teacher

  def recording_load_teacher(*args):
    teacher = load_teacher(*args)
    teachers.append(teacher)
    return teacher

  workdirs = {}
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(distill, 'load_teacher', recording_load_teacher)
    for name, config in (
      ('plain', student_config()),
      ('alpha0', student_config(straight_run, **{'distill.alpha': 0.0})),
      ('distilled', student_config(straight_run)),
    ):
      workdirs[name] = tmp_path_factory.mktemp(name)
      trainer.train_and_evaluate(config, str(workdirs[name]))
  return Trained(workdirs, teacher_files, [teacher for teacher in teachers if teacher is not None])


def test_alpha_zero_is_bitwise_plain_training(trained):
  plain, alpha0, distilled = (
    leaves(load_checkpoint(trained.workdirs[name], STEPS)) for name in ('plain', 'alpha0', 'distilled')
  )
  assert alpha0.keys() == plain.keys()
  for path, value in alpha0.items():
    np.testing.assert_array_equal(value, plain[path], err_msg=path)
  assert not np.array_equal(distilled[HEAD_KERNEL], plain[HEAD_KERNEL])  # The teacher teaches.


def test_the_teacher_is_unchanged(straight_run, trained):
  assert file_digests(straight_run / 'checkpoints') == trained.teacher_files
  step = finished_steps(straight_run)[-1]
  saved = leaves(load_checkpoint(straight_run, step))
  assert len(trained.teachers) == 2
  for teacher in trained.teachers:
    assert teacher.identity == {'path': str(straight_run), 'step': step}
    for path, value in leaves(teacher.variables).items():
      assert not value.is_deleted(), path  # Never donated to the step.
      np.testing.assert_array_equal(value, saved[path], err_msg=path)


def test_distillation_brings_the_students_predictions_nearer_the_teachers(straight_run, trained):
  """KL(teacher || student) of the test images' predicted distributions, after the same steps with and without it."""
  teacher = log_softmax(logits_on_test_images(straight_run), axis=-1)
  kl = {}
  for name in ('plain', 'distilled'):
    student = log_softmax(logits_on_test_images(trained.workdirs[name]), axis=-1)
    kl[name] = np.mean(np.sum(np.exp(teacher) * (teacher - student), axis=-1))
  assert kl['distilled'] < 0.85 * kl['plain'], kl  # 0.73x measured.


def test_run_json_records_the_teacher(straight_run, trained):
  workdirs = trained.workdirs
  step = finished_steps(straight_run)[-1]
  assert json.loads((workdirs['distilled'] / RUN_FILE).read_text())['teacher'] == {
    'path': str(straight_run),
    'step': step,
  }
  assert json.loads((workdirs['plain'] / RUN_FILE).read_text())['teacher'] is None


@pytest.mark.parametrize('change', ['another_step', 'no_teacher', 'a_teacher'])
def test_a_resume_with_another_teacher_is_refused(straight_run, trained, change):
  workdirs = trained.workdirs
  other_step = finished_steps(straight_run)[0]
  workdir, config = {
    'another_step': (
      workdirs['distilled'],
      student_config(straight_run, **{'distill.teacher_checkpoint': str(other_step)}),
    ),
    'no_teacher': (workdirs['distilled'], student_config()),
    'a_teacher': (workdirs['plain'], student_config(straight_run)),
  }[change]
  before = file_digests(workdir)
  with pytest.raises(
    ConfigError, match=r'holds checkpoints of another model, data shape, teacher, quantization or pruning \(teacher: '
  ) as error:
    trainer.train_and_evaluate(config, str(workdir))
  assert '\n' not in str(error.value)
  assert file_digests(workdir) == before


# Refusals.


@pytest.mark.parametrize(
  'fields, message',
  [
    ({'data.synthetic_num_classes': 5}, r"was trained on the classes \['class_0', .*\], this run has \['class_0', "),
    ({'data.synthetic_image_size': 24}, r'was trained on 32x32x3 images, this run has 24x24x3'),
  ],
  ids=['classes', 'image_size'],
)
def test_a_teacher_of_other_data_is_refused(straight_run, fields, message):
  config = student_config(straight_run, **fields)
  with pytest.raises(ConfigError, match=r"--config.distill.teacher='.*' " + message) as error:
    distill.load_teacher(config, data.load_splits(config.data)['train'])
  assert '\n' not in str(error.value)


def test_a_missing_teacher_is_one_line(tmp_path):
  config = student_config(tmp_path / 'missing')
  with pytest.raises(ConfigError, match=r"^--config.distill.teacher='.*missing' does not exist: point it at"):
    distill.load_teacher(config, data.load_splits(config.data)['train'])


@pytest.mark.parametrize(
  'fields, message',
  [
    ({'distill.alpha': 1.5}, r'distill.alpha=1.5 is invalid: must be in \[0, 1\]'),
    ({'distill.temperature': 0.0}, r'distill.temperature=0.0 is invalid: must be > 0'),
    ({'distill.teacher_checkpoint': 'newest'}, r'distill.teacher_checkpoint=.* choose best, latest or a step number'),
  ],
)
def test_config_rules(fields, message):
  config_checks.validate(student_config('runs/teacher', **{'distill.alpha': 1.0, 'distill.teacher_checkpoint': '7'}))
  with pytest.raises(ConfigError, match=message):
    config_checks.validate(student_config('runs/teacher', **fields))


def test_distill_fields_without_a_teacher_are_refused():
  config = student_config(**{'distill.temperature': 2.0})
  with pytest.raises(ConfigError, match=r'distill.temperature=2.0 does nothing without distill.teacher'):
    config_checks.validate(config)


def test_an_old_run_json_without_a_teacher_still_loads_and_resumes(tmp_path):
  info = tiny_run_info()
  saved = info.to_json()
  del saved['teacher']  # The run.json of earlier versions.
  assert RunInfo.from_json(saved) == info
  (tmp_path / RUN_FILE).write_text(json.dumps(saved))
  check_resumable(str(tmp_path), info)
  with pytest.raises(ConfigError, match=r"teacher: None -> \{'path': '/t', 'step': 4\}"):
    check_resumable(str(tmp_path), dataclasses.replace(info, teacher={'path': '/t', 'step': 4}))


@pytest.mark.slow
def test_a_distilled_run_from_the_command_line_resumes_bitwise_and_evaluates(straight_run, tmp_path):
  """A student of another architecture (squeeze-excitation blocks), with SAM and mixup: the teacher sees
  the mixed batch once per step, and a resume reloads the same teacher."""
  args = (
    f'--config.distill.teacher={straight_run}',
    '--config.model.se_ratio=0.25',
    '--config.optim.name=sam',
    '--config.augment.mixup_alpha=0.2',
  )
  uninterrupted, resumed = tmp_path / 'uninterrupted', tmp_path / 'resumed'
  returncode, output = run_main(uninterrupted, *args)  # Smoke: 16 steps, checkpoints 15 and 16 kept.
  assert returncode == 0, output
  assert f'Distilling from {straight_run}, step {finished_steps(straight_run)[-1]} (resnet_tiny' in output
  shutil.copytree(uninterrupted, resumed)
  shutil.rmtree(resumed / 'checkpoints' / '16')  # As if killed after step 15.
  returncode, output = run_main(resumed, *args)
  assert returncode == 0 and 'Resuming from the checkpoint of step 15' in output, output
  final, again = load_checkpoint(uninterrupted, 16), load_checkpoint(resumed, 16)
  for name in ('params', 'batch_stats', 'opt_state', 'step'):
    jax.tree.map(np.testing.assert_array_equal, final[name], again[name])
  returncode, output = run_main(resumed, '--mode=evaluate')
  assert returncode == 0 and 'Step 16: accuracy' in output, output
