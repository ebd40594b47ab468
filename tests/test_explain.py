"""Explanations (`resnet_flax.explain`): Grad-CAM, integrated gradients, the randomisation sanity check,
`Model.explain` and `--mode=explain`.

The fast tests train a toy model in-process: resnet_tiny on 16x16 grey noise with one 5x5 square whose
colour (red, green, blue) is the class. The evidence sits in one known place, so a map can be checked
for finding it. The sanity check's threshold is tested on natural images (slow, real CIFAR-10): on the
toy, the stages that stay trained still find the one salient square, and Grad-CAM's rank correlation
after re-initialising the classifier and last stage is 0.38 on average over 8 random draws, from -0.18
to 0.63 (32x32 toy), where CIFAR-10 test images give -0.12 to 0.06. The slow tests also run main.py on
the shared smoke run (`straight_run`: resnet_tiny, 10 synthetic classes, 32x32 images).
"""

import functools
import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import resnet_flax
from configs import smoke
from resnet_flax import models
from resnet_flax.compress import quantize
from resnet_flax.data import DataError, augment
from resnet_flax.explain import command, methods
from resnet_flax.models import trained

from helpers import numpy_variables, read_class_folders, run_main, train_tiny

SIZE, SQUARE = 16, 5
COLOURS = np.array([[230, 30, 30], [30, 230, 30], [30, 30, 230]], np.uint8)  # The classes: red, green, blue.
NUM_EXPLAINED = 8
CIFAR_EXPLAINED = 32
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def squares(count: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`count` toy images, their classes and the (row, column) of each square's top-left corner."""
  rng = np.random.default_rng(seed)
  images = rng.integers(60, 196, (count, SIZE, SIZE, 3), dtype=np.uint8)
  labels = rng.integers(0, len(COLOURS), count).astype(np.int32)
  corners = rng.integers(0, SIZE - SQUARE + 1, (count, 2))
  for image, label, (row, column) in zip(images, labels, corners, strict=True):
    image[row : row + SQUARE, column : column + SQUARE] = COLOURS[label]
  return images, labels, corners


def in_square(maps: np.ndarray, corners: np.ndarray) -> np.ndarray:
  """Whether each map's largest value lies inside its image's square."""
  peaks = np.array([np.unravel_index(m.argmax(), m.shape) for m in maps])
  return np.all((peaks >= corners) & (peaks < corners + SQUARE), axis=1)


@pytest.fixture(scope='module')
def toy() -> trained.Restored:
  images, labels, _ = squares(40 * 32, seed=0)
  return train_tiny(images, labels, ('red', 'green', 'blue'), steps=40)


@pytest.fixture(scope='module')
def explained(toy):
  """(explanation of NUM_EXPLAINED unseen toy images for their predicted classes, labels, corners, explainer)."""
  images, labels, corners = squares(NUM_EXPLAINED, seed=1)
  explainer = methods.compile_explain(toy)
  return explainer(images, np.full(NUM_EXPLAINED, -1, np.int32)), labels, corners, explainer


@pytest.fixture(scope='module')
def cifar(cifar_tiny, cifar10_jpeg_dir):
  """(resnet_tiny trained briefly on real CIFAR-10 JPEGs, CIFAR_EXPLAINED test images, their labels)."""
  per_class = CIFAR_EXPLAINED // len(cifar_tiny.run.info.class_names) + 1
  test_images, test_labels, _ = read_class_folders(cifar10_jpeg_dir / 'test', per_class)
  chosen = np.random.default_rng(1).permutation(len(test_images))[:CIFAR_EXPLAINED]
  return cifar_tiny, test_images[chosen], test_labels[chosen]


# The named point in models.py.


TINY_ARCHITECTURES = {
  'post-activation': functools.partial(models.ResNet, (1, 1), models.ResNetBlock, (8, 16)),
  'pre-activation': functools.partial(models.ResNet, (1, 1), models.PreActBlock, (8, 16)),
  'densenet': functools.partial(models.DenseNet, depth=10, growth_rate=4),
}


@pytest.mark.parametrize('architecture', sorted(TINY_ARCHITECTURES))
def test_features_enter_pooling_and_leave_the_variables_and_the_forward_pass_as_they_were(architecture):
  model = TINY_ARCHITECTURES[architecture](num_classes=3)
  assert set(models.init_variables(model, (8, 8, 3))) == {'params', 'batch_stats'}  # Nothing for a checkpoint.
  variables = numpy_variables(model, (8, 8, 3))
  images = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  logits, state = model.apply(variables, images, train=False, mutable=['intermediates'])
  (features,) = state['intermediates'][models.FEATURES]
  head = variables['params'][models.HEAD]
  np.testing.assert_allclose(features.mean(axis=(1, 2)) @ head['kernel'] + head['bias'], logits, rtol=1e-5, atol=1e-5)
  assert np.array_equal(model.apply(variables, images, train=False), logits)


def test_a_perturbation_of_the_features_moves_the_logits_and_training_sees_none():
  model = TINY_ARCHITECTURES['post-activation'](num_classes=3)
  variables = numpy_variables(model, (8, 8, 3))
  images = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  logits, state = model.apply(variables, images, train=False, mutable=['intermediates'])
  shift = jnp.ones_like(state['intermediates'][models.FEATURES][0])
  perturbed = model.apply({**variables, 'perturbations': {models.FEATURES: shift}}, images, train=False)
  head = variables['params'][models.HEAD]  # The logits move by the classifier of the pooled perturbation.
  np.testing.assert_allclose(perturbed - logits, np.ones((2, 1)) * head['kernel'].sum(axis=0), rtol=1e-4, atol=1e-4)
  _, trained = model.apply(variables, images, train=True, mutable=['batch_stats'])
  assert set(trained) == {'batch_stats'}


def test_last_stage_names_modules_that_exist():
  expected = {
    'resnet_tiny': ('ResNetBlock_2',),
    'resnet18': ('ResNetBlock_6', 'ResNetBlock_7'),
    'preact_resnet18': ('PreActBlock_6', 'PreActBlock_7', 'final_norm'),
    'wrn16_4': ('PreActBlock_4', 'PreActBlock_5', 'final_norm'),
    'densenet_bc100_k12': ('DenseBlock_2', 'final_norm'),
  }
  for name, stage in expected.items():
    assert methods.last_stage(models.create_model(name, 10)) == stage
  for architecture in TINY_ARCHITECTURES.values():
    model = architecture(num_classes=3)
    assert set(methods.last_stage(model)) <= set(models.init_variables(model, (8, 8, 3))['params'])


# Grad-CAM.


def test_grad_cam_maps_are_non_negative_at_input_size_and_find_the_square(explained):
  explanation, labels, corners, _ = explained
  assert np.array_equal(explanation.predicted, labels)  # The toy model has learnt its task.
  assert explanation.grad_cam.shape == (NUM_EXPLAINED, SIZE, SIZE) and explanation.grad_cam.dtype == np.float32
  assert explanation.grad_cam.min() >= 0 and np.all(explanation.grad_cam.max(axis=(1, 2)) > 0)
  assert in_square(explanation.grad_cam, corners).mean() >= 0.75


def test_grad_cam_is_class_activation_mapping_behind_pooling_and_a_linear_classifier(toy, explained):
  """alpha_k = classifier weight / (h w): Grad-CAM equals CAM (Zhou et al. 2016), a closed form."""
  explanation = explained[0]
  normalized = augment.normalize(explanation.pixels, toy.run.info.pixel_mean, toy.run.info.pixel_std)
  _, state = toy.model.apply(toy.variables, normalized, train=False, mutable=['intermediates'])
  (features,) = state['intermediates'][models.FEATURES]
  height, width = features.shape[1:3]
  weights = toy.variables['params'][models.HEAD]['kernel'][:, explanation.classes].T / (height * width)
  cam = nn.relu(jnp.einsum('nhwk,nk->nhw', features, weights))
  expected = jax.image.resize(cam, (NUM_EXPLAINED, SIZE, SIZE), 'bilinear')
  np.testing.assert_allclose(explanation.grad_cam, expected, rtol=1e-4, atol=1e-6)


def test_a_given_class_is_explained_instead_of_the_predicted_one(toy, explained):
  explanation, labels, corners, explainer = explained
  other = (labels + 1) % len(COLOURS)
  against = explainer(explanation.pixels, other.astype(np.int32), steps=methods.IG_STEPS)
  assert np.array_equal(against.classes, other)
  assert np.all(against.logits < explanation.logits)
  assert not np.allclose(against.grad_cam, explanation.grad_cam)


# Integrated gradients.


def test_quadrature_weights_sum_to_one_and_integrate_polynomials_of_degree_2n_minus_1_exactly():
  for steps in (1, 8, methods.IG_STEPS):
    alphas, weights = methods.quadrature(steps)
    assert np.all((alphas > 0) & (alphas < 1))
    assert np.isclose(weights.sum(), 1.0)  # A mean of the path's gradients, not their sum.
    degree = 2 * steps - 1
    assert np.isclose(np.sum(weights * alphas**degree), 1 / (degree + 1))


def test_integrated_gradients_of_a_quadratic_are_exact_and_complete():
  """F(x) = sum(w x^2): its attributions are w (x^2 - b^2) exactly, and sum to F(x) - F(b)."""
  w = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  logits_fn = lambda x: jnp.stack([jnp.sum(w[0] * x**2, axis=(1, 2, 3)), jnp.sum(w[1] * x**2, axis=(1, 2, 3))], -1)
  images = jax.random.uniform(jax.random.key(1), (3, 4, 4, 3))
  targets = jnp.array([0, 1, 1])
  gradients_fn = functools.partial(methods.path_gradients, logits_fn, baseline=0.25)
  attributions = methods.integrated_gradients(gradients_fn, images, targets, steps=2, baseline=0.25)
  np.testing.assert_allclose(attributions, w[targets] * (images**2 - 0.25**2), rtol=1e-5, atol=1e-6)


def test_completeness_error_is_within_one_percent_at_the_default_steps(explained):
  explanation = explained[0]
  assert np.all(explanation.steps == methods.IG_STEPS)  # None needed more.
  assert explanation.attributions.shape == (NUM_EXPLAINED, SIZE, SIZE, 3)
  assert explanation.integrated_gradients.shape == (NUM_EXPLAINED, SIZE, SIZE)
  assert np.all(np.abs(explanation.logits - explanation.baseline_logits) > 1)  # The error is relative to it.
  assert explanation.completeness_error.max() <= 0.01, explanation.completeness_error


def test_steps_double_for_the_images_short_of_the_tolerance_up_to_the_maximum(explained, monkeypatch):
  explanation, _, _, explainer = explained
  coarse = explainer(explanation.pixels, explanation.classes, steps=2)
  assert np.all(coarse.steps == 2) and np.any(coarse.completeness_error > methods.IG_TOLERANCE)
  monkeypatch.setattr(methods, 'IG_STEPS', 2)
  monkeypatch.setattr(methods, 'IG_MAX_STEPS', 32)
  refined = explainer(explanation.pixels, explanation.classes)
  np.testing.assert_array_equal(refined.steps == 2, coarse.completeness_error <= methods.IG_TOLERANCE)
  assert set(refined.steps) <= {2, 4, 8, 16, 32}
  assert np.all((refined.completeness_error <= methods.IG_TOLERANCE) | (refined.steps == 32))


def test_completeness_error_is_the_relative_gap_of_sum_and_logit_difference(explained):
  explanation = explained[0]
  doubled = methods.Explanation(**{**vars(explanation), 'attributions': 2 * explanation.attributions})
  expected = np.abs(
    2 * explanation.attributions.sum(axis=(1, 2, 3)) / (explanation.logits - explanation.baseline_logits) - 1
  )
  np.testing.assert_allclose(doubled.completeness_error, expected, rtol=1e-4)


# The sanity check.


def test_randomization_check_changes_the_maps_and_would_see_them_unchanged(explained):
  explanation, _, _, explainer = explained
  check = methods.randomization_check(explainer, explanation, seed=1)
  assert check['reinitialized'] == [models.HEAD, 'ResNetBlock_2']
  assert check['grad_cam_rank_correlation'] < 0.9 and check['integrated_gradients_rank_correlation'] < 0.9, check
  assert len(check['per_image_grad_cam']) == NUM_EXPLAINED
  unchanged = methods.randomized_variables(explainer.restored, jax.random.key(1), names=())
  same = explainer(explanation.pixels, explanation.classes, methods.IG_STEPS, variables=unchanged)
  np.testing.assert_allclose(methods.rank_correlations(explanation.grad_cam, same.grad_cam), 1.0)


@pytest.mark.slow
def test_on_natural_images_the_maps_pass_the_randomization_check_and_completeness(cifar):
  """Adebayo et al.'s check with the threshold of issue 14 (< 0.5), for three random re-initialisations."""
  restored, images, labels = cifar
  explainer = methods.compile_explain(restored)
  explanation = explainer(images, np.full(len(images), -1, np.int32))
  assert np.mean(explanation.predicted == labels) > 0.3  # Trained (0.41): chance is 0.1.
  # The relative error is ill-conditioned where F(x) - F(x') is near 0 (one image here: -0.07, 1.9% at the cap).
  within = explanation.completeness_error <= methods.IG_TOLERANCE
  assert np.all(within | (explanation.steps == methods.IG_MAX_STEPS)) and within.mean() >= 0.9
  for seed in (1, 2, 3):
    check = methods.randomization_check(explainer, explanation, seed)
    assert check['grad_cam_rank_correlation'] < 0.5, check


def test_randomized_variables_replace_exactly_the_named_modules(toy):
  randomized = methods.randomized_variables(toy, jax.random.key(1), (models.HEAD, 'ResNetBlock_2'))
  for collection, tree in toy.variables.items():
    for name, module in tree.items():
      same = all(jax.tree.leaves(jax.tree.map(np.array_equal, module, randomized[collection][name])))
      assert same == (name not in (models.HEAD, 'ResNetBlock_2')), (collection, name)


# Choices.


def test_class_indices_take_nothing_one_class_or_one_per_image_by_index_or_name():
  names = ('red', 'green', 'blue')
  assert methods.class_indices(None, names, 2).tolist() == [-1, -1]
  assert methods.class_indices('blue', names, 2).tolist() == [2, 2]
  assert methods.class_indices([1, 'red'], names, 2).tolist() == [1, 0]
  for bad in ('violet', 3, [0]):
    with pytest.raises(ValueError):
      methods.class_indices(bad, names, 2)


def test_test_images_are_half_correct_half_misclassified_where_the_class_has_them():
  labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
  predictions = np.array([0, 1, 0, 2, 1, 1, 1, 0, 1, 0])  # Class 1 is never wrong, class 2 never right.
  indices, short = command.choose_test_images(labels, predictions, per_class=2)
  assert indices.tolist() == [0, 1, 4, 5, 7, 8]
  assert short == {1: 0}
  indices, short = command.choose_test_images(labels, predictions, per_class=3)
  assert indices.tolist() == [0, 2, 1, 4, 5, 6, 7, 8, 9] and short == {1: 0}


def test_a_model_served_in_int8_is_refused(toy):
  int8 = trained.Restored(toy.run, toy.model, toy.variables, toy.step, quantize.Recipe('ptq'))
  with pytest.raises(resnet_flax.errors.ConfigError, match='float model'):
    methods.compile_explain(int8)


# End to end.


@pytest.fixture(scope='module')
def smoke_copy(straight_run, tmp_path_factory):
  """A copy of the smoke run: --mode=explain writes into it."""
  workdir = tmp_path_factory.mktemp('explain') / 'run'
  shutil.copytree(straight_run, workdir, ignore=shutil.ignore_patterns('eval', 'explain'))
  return workdir


def read_outputs(workdir):
  directory = workdir / command.OUTPUT_DIR
  assert (directory / command.GRID_FILE).read_bytes().startswith(PNG_MAGIC)
  return json.loads((directory / command.JSON_FILE).read_text())


@pytest.mark.slow
def test_mode_explain_explains_test_images_per_class(smoke_copy):
  returncode, output = run_main(smoke_copy, '--mode=explain', '--explain_per_class=2')
  assert returncode == 0, output
  results = read_outputs(smoke_copy)
  records = results['images']
  classes = smoke.get_config().data.synthetic_num_classes
  assert len(records) == 2 * classes
  assert 'misclassified' in results['selection']
  for record in records:
    assert record['correct'] == (record['true_class'] == record['predicted_class'])
    assert record['explained_class'] == record['predicted_class'] and 0 < record['probability'] <= 1
    assert record['completeness_error'] <= 0.01
  assert sorted({r['true_class'] for r in records}) == sorted(r['true_class'] for r in records[::2])
  assert results['integrated_gradients']['steps'].startswith(f'{methods.IG_STEPS}, doubled')  # Adaptive.
  assert {r['integrated_gradients_steps'] for r in records} <= {64, 128, 256, 512, 1024}
  assert results['sanity_check']['reinitialized'] == [models.HEAD, 'ResNetBlock_2']
  with Image.open(smoke_copy / command.OUTPUT_DIR / command.GRID_FILE) as grid:
    assert grid.height > grid.width  # One row per image.


@pytest.mark.slow
def test_mode_explain_explains_any_image_of_predict_paths(smoke_copy, tmp_path):
  folder = tmp_path / 'class_3'  # A folder named after a class gives its images' true class.
  folder.mkdir()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(folder / 'wide.png')
  Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(tmp_path / 'grey.jpg')
  returncode, output = run_main(smoke_copy, '--mode=explain', f'--predict_paths={folder},{tmp_path / "grey.jpg"}')
  assert returncode == 0, output
  records = read_outputs(smoke_copy)['images']
  assert [r['source'] for r in records] == [str(folder / 'wide.png'), str(tmp_path / 'grey.jpg')]
  assert [r['true_class'] for r in records] == ['class_3', None]
  assert records[1]['correct'] is None


@pytest.mark.slow
@pytest.mark.parametrize('content', [None, b'not an image'])
def test_mode_explain_bad_input_is_one_line(smoke_copy, tmp_path, content):
  path = tmp_path / 'broken.png'
  if content:
    path.write_bytes(content)
  returncode, output = run_main(smoke_copy, '--mode=explain', f'--predict_paths={path}')
  assert returncode == 1
  assert output.strip().splitlines()[-1].startswith(f'error: {"cannot decode " if content else ""}{path}')


@pytest.mark.slow
def test_python_api_explains_images_of_any_size(straight_run):
  model = resnet_flax.load(str(straight_run))
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), rng.integers(0, 256, (20, 20), dtype=np.uint8)]
  explanation = model.explain(images, classes='class_1')
  height, width = model.image_size
  assert explanation.grad_cam.shape == (2, height, width) and explanation.attributions.shape == (2, height, width, 3)
  assert explanation.classes.tolist() == [model.class_names.index('class_1')] * 2
  assert explanation.completeness_error.max() <= 0.01
  np.testing.assert_allclose(explanation.probabilities, model.predict(images), rtol=1e-4, atol=1e-6)
  with pytest.raises(DataError):
    model.explain([])
