"""Class imbalance: loss weights per class (`optim.class_weights`) and balanced sampling (`data.sampling`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.utils.class_weight import compute_class_weight

from configs import smoke
from resnet_flax import optim
from resnet_flax.data import ImageData, input_pipeline
from resnet_flax.errors import ConfigError
from resnet_flax.run import distributed
from resnet_flax.train import config_checks, loop, step, trainer

import helpers

CLASS_NAMES = ('cat', 'dog', 'frog')
BATCH = 16


def imbalanced_labels(counts=(100, 100, 10)) -> np.ndarray:
  return np.repeat(np.arange(len(counts)), counts).astype(np.int32)


@pytest.fixture(scope='module')
def split():
  """300 / 80 / 20 examples of three classes, shuffled; pixel (0, 0, 0) names the example."""
  labels = np.random.default_rng(0).permutation(imbalanced_labels((300, 80, 20)))
  images = np.zeros((len(labels), 4, 4, 3), np.uint8)
  images[:, 0, 0, 0], images[:, 0, 0, 1] = np.arange(len(labels)) % 256, np.arange(len(labels)) // 256
  return ImageData(images, labels, CLASS_NAMES)


# Loss weights.


def test_balanced_weights_give_a_class_cut_to_10_percent_a_10x_larger_weight():
  labels = imbalanced_labels()
  weights = optim.class_weight_vector('balanced', labels, CLASS_NAMES)
  assert weights.dtype == np.float32 and weights.shape == (3,)
  assert weights[2] == pytest.approx(10 * weights[0]) and weights[0] == weights[1]
  assert weights[labels].mean() == pytest.approx(1.0)  # The loss keeps its scale.
  np.testing.assert_allclose(weights, compute_class_weight('balanced', classes=np.arange(3), y=labels), rtol=1e-6)


def test_a_class_absent_from_the_training_labels_keeps_weight_1():
  weights = optim.class_weight_vector('balanced', imbalanced_labels((30, 0, 10)), CLASS_NAMES)
  np.testing.assert_allclose(weights, [40 / 60, 1.0, 40 / 20])


def test_a_mapping_weighs_the_classes_it_names_and_leaves_the_others_at_1():
  weights = optim.class_weight_vector("{'frog': 2.5, 'cat': 0.5}", imbalanced_labels(), CLASS_NAMES)
  np.testing.assert_array_equal(weights, np.array([0.5, 1.0, 2.5], np.float32))
  assert optim.class_weight_vector('none', imbalanced_labels(), CLASS_NAMES) is None  # The step stays unweighted.


@pytest.mark.parametrize(
  'spec, message',
  [
    ('inverse', 'choose none, balanced or a mapping of class names to weights such as'),
    ("{'cat': 2.0", 'choose none, balanced or a mapping'),
    ("{'cat': -1}", "the weight of 'cat' is -1: weights must be numbers > 0"),
    ("{'cat': 0}", "the weight of 'cat' is 0: weights must be numbers > 0"),
    ('{3: 2.0}', 'class 3 is not a name: quote it'),
  ],
)
def test_a_bad_class_weights_value_is_one_clear_line_before_training(spec, message):
  config = smoke.get_config()
  config.optim.class_weights = spec
  with pytest.raises(ConfigError, match=r'^--config\.optim\.class_weights=.* is invalid: ') as error:
    config_checks.validate(config)
  assert message in str(error.value) and '\n' not in str(error.value)


def test_an_unknown_class_name_is_one_line_from_the_command_line_and_nothing_trains(tmp_path):
  returncode, output = helpers.run_main(tmp_path, "--config.optim.class_weights={'class_3': 2.0, 'zebra': 3}")
  assert returncode != 0
  assert output.strip().splitlines()[-1] == (
    "error: --config.optim.class_weights names classes the training data lacks: 'zebra'; name only its classes: "
    + ', '.join(f'class_{i}' for i in range(10))
  ), output
  assert not helpers.finished_steps(tmp_path)


def test_weighted_loss_is_the_mean_of_the_weighted_cross_entropies():
  logits = jnp.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0], [0.0, 0.0, 4.0]])
  labels = np.array([0, 2, 1, 2])
  weights = np.array([0.5, 1.0, 4.0], np.float32)
  log_probabilities = jax.nn.log_softmax(logits)
  by_hand = -sum(weights[y] * log_probabilities[i, y] for i, y in enumerate(labels)) / len(labels)
  loss = step.cross_entropy(logits, jax.nn.one_hot(labels, 3), class_weights=weights).mean()
  assert loss == pytest.approx(float(by_hand), rel=1e-6)
  assert step.cross_entropy(logits, jax.nn.one_hot(labels, 3), class_weights=np.ones(3)).mean() == pytest.approx(
    float(step.cross_entropy(logits, jax.nn.one_hot(labels, 3)).mean()), rel=1e-7
  )


def test_a_mixed_target_weighs_its_example_by_the_mix_of_its_classes():
  """Mixup/CutMix targets: 0.7 of class 0 and 0.3 of class 2 weigh 0.7 w0 + 0.3 w2; smoothing leaves it."""
  logits = jnp.array([[1.0, -0.5, 0.25]])
  target = jnp.array([[0.7, 0.0, 0.3]])
  weights = np.array([0.5, 1.0, 4.0], np.float32)
  unweighted = step.cross_entropy(logits, target, label_smoothing=0.1)
  weighted = step.cross_entropy(logits, target, label_smoothing=0.1, class_weights=weights)
  np.testing.assert_allclose(weighted, unweighted * (0.7 * 0.5 + 0.3 * 4.0), rtol=1e-6)


# Balanced sampling.


def train_batches(split, name, start, stop, sampling='balanced', seed=3):
  """The batches of steps start..stop - 1, one step a call."""
  pipeline = input_pipeline.create_pipeline(name, split, BATCH, seed, distributed.create_mesh(), sampling=sampling)
  stacks = [jax.tree.map(np.asarray, b) for b in pipeline.train_batches(start, [1] * (stop - start))]
  return [{k: v[0] for k, v in stack.items()} for stack in stacks]


def test_balanced_epochs_draw_every_class_about_equally_often(split):
  strata = input_pipeline.class_strata(split.labels)
  n = len(split)
  for epoch in range(4):
    order = np.asarray(input_pipeline.epoch_order(7, epoch, n, strata))
    assert order.shape == (n,) and order.dtype == np.int32 and 0 <= order.min() and order.max() < n
    counts = np.bincount(split.labels[order], minlength=3)
    # Binomial(400, 1/3): standard deviation 9.4; the unbalanced counts are 300 / 80 / 20.
    assert np.all(np.abs(counts - n / 3) < 40), counts
    assert len(np.unique(order[split.labels[order] == 2])) == 20  # Every example of the rare class is drawn.
  assert not np.array_equal(
    input_pipeline.epoch_order(7, 0, n, strata), input_pipeline.epoch_order(7, 1, n, strata)
  )  # Another epoch, another draw.


def test_shuffle_stays_the_permutation_of_before(split):
  np.testing.assert_array_equal(
    input_pipeline.epoch_order(3, 2, len(split)), input_pipeline.epoch_permutation(3, 2, len(split))
  )
  default = train_batches(split, 'device', 0, 3, sampling='shuffle')
  permutation = np.asarray(input_pipeline.epoch_permutation(3, 0, len(split)))
  np.testing.assert_array_equal(np.concatenate([b['index'] for b in default]), permutation[: 3 * BATCH])


def test_balanced_batches_are_identical_in_both_pipelines_and_after_a_resume(split):
  steps_per_epoch = len(split) // BATCH  # 25.
  tfdata, device = train_batches(split, 'tfdata', 0, 30), train_batches(split, 'device', 0, 30)
  for a, b in zip(tfdata, device, strict=True):
    jax.tree.map(np.testing.assert_array_equal, a, b)
  for batch in device:
    np.testing.assert_array_equal(batch['label'], split.labels[batch['index']])
  order = np.asarray(input_pipeline.epoch_order(3, 0, len(split), input_pipeline.class_strata(split.labels)))
  np.testing.assert_array_equal(np.concatenate([b['index'] for b in device[:steps_per_epoch]]), order[:400])
  for name in ('tfdata', 'device'):
    for resume_at in (7, steps_per_epoch + 2):
      for a, b in zip(train_batches(split, name, resume_at, 30), device[resume_at:], strict=True):
        jax.tree.map(np.testing.assert_array_equal, a, b)


def test_an_unknown_sampling_is_refused():
  config = smoke.get_config()
  config.data.sampling = 'oversample'
  with pytest.raises(
    ConfigError, match="--config.data.sampling='oversample' is invalid: choose one of shuffle, balanced"
  ):
    config_checks.validate(config)


def test_a_run_with_balanced_sampling_and_weights_trains_without_hidden_transfers(tmp_path, monkeypatch):
  """Both options reach the compiled steps, as constants and device arrays, with no implicit host-device copies;
  the weights weigh the training loss only."""
  run, cross_entropy, weights_seen = loop.TrainLoop.run, step.cross_entropy, []

  def guarded_run(self, state, start_step):
    with jax.transfer_guard('disallow'):
      return run(self, state, start_step)

  def recording_cross_entropy(logits, targets, label_smoothing=0.0, class_weights=None):
    weights_seen.append(None if class_weights is None else np.asarray(class_weights).tolist())
    return cross_entropy(logits, targets, label_smoothing, class_weights)

  monkeypatch.setattr(loop.TrainLoop, 'run', guarded_run)
  monkeypatch.setattr(step, 'cross_entropy', recording_cross_entropy)
  config = smoke.get_config()
  config.num_epochs, config.data.pipeline = 1.0, 'device'
  config.data.sampling, config.optim.class_weights = 'balanced', "{'class_0': 3.0}"
  metrics = trainer.train_and_evaluate(config, str(tmp_path))
  assert helpers.finished_steps(tmp_path)[-1] == 8 and metrics['accuracy'] > 0
  assert weights_seen == [[3.0] + [1.0] * 9, None]  # Traced once each: the train step, then the eval step.
