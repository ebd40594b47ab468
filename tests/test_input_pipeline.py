"""Both input pipelines: the same step-indexed batches, exact resume, padded evaluation."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from resnet_flax.data import ImageData, input_pipeline
from resnet_flax.run import distributed
from resnet_flax.run.workdir import epoch_of, epochs_at

NUM_EXAMPLES, BATCH = 100, 16  # 6 steps per epoch; 4 examples are left out of each epoch.


@pytest.fixture(scope='module')
def split():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (NUM_EXAMPLES, 8, 8, 3), dtype=np.uint8)
  images[:, 0, 0, 0] = np.arange(NUM_EXAMPLES)  # Pixel (0, 0, 0) names the example.
  return ImageData(images, np.arange(NUM_EXAMPLES, dtype=np.int32) % 10, tuple('abcdefghij'))


def batches(name, split, start, stop, seed=3, lengths=None):
  """The batches of steps start..stop - 1, one a step, from calls of `lengths` (default 1 each)."""
  pipeline = input_pipeline.create_pipeline(name, split, BATCH, seed, distributed.create_mesh())
  lengths = lengths or [1] * (stop - start)
  assert sum(lengths) == stop - start
  stacks = [jax.tree.map(np.asarray, b) for b in pipeline.train_batches(start, lengths)]
  assert [len(stack['label']) for stack in stacks] == lengths
  return [{k: v[i] for k, v in stack.items()} for stack in stacks for i in range(len(stack['label']))]


def example_ids(batch_list):
  return [b['image'][:, 0, 0, 0].tolist() for b in batch_list]


def test_the_epoch_of_a_step_is_the_same_on_the_host_and_in_jit():
  steps = np.arange(20)
  expected = [step // 6 for step in range(20)]
  assert [epoch_of(step, 6) for step in range(20)] == expected
  assert jax.jit(lambda s: epoch_of(s, 6))(steps).tolist() == expected
  assert epochs_at(9, 6) == 1.5 and epochs_at(steps, 6).tolist() == (steps / 6).tolist()


def test_both_pipelines_give_the_same_batches(split):
  tfdata, device = batches('tfdata', split, 0, 20), batches('device', split, 0, 20)
  assert len(tfdata) == len(device) == 20
  for a, b in zip(tfdata, device, strict=True):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
    np.testing.assert_array_equal(a['index'], b['index'])
    np.testing.assert_array_equal(a['index'], a['image'][:, 0, 0, 0])  # Each example's place in the split.
    assert a['image'].dtype == np.uint8 and a['image'].shape == (BATCH, 8, 8, 3)


def test_batches_follow_the_epoch_permutation(split):
  ids = example_ids(batches('device', split, 0, 12))
  for epoch in (0, 1):
    perm = np.asarray(input_pipeline.epoch_permutation(3, epoch, NUM_EXAMPLES))
    epoch_ids = sum(ids[epoch * 6 : (epoch + 1) * 6], [])
    assert epoch_ids == perm[: 6 * BATCH].tolist()
  assert sorted(sum(ids[:6], [])) != sorted(sum(ids[6:], []))  # Each epoch leaves out other examples.
  np.testing.assert_array_equal(batches('device', split, 0, 1)[0]['label'], split.labels[ids[0]])


@pytest.mark.parametrize('name', ['tfdata', 'device'])
@pytest.mark.parametrize('resume_at', [1, 6, 9])
def test_resuming_at_step_k_continues_the_uninterrupted_run(split, name, resume_at):
  uninterrupted = example_ids(batches(name, split, 0, 14))
  assert example_ids(batches(name, split, resume_at, 14)) == uninterrupted[resume_at:]


@pytest.mark.parametrize('name', ['tfdata', 'device'])
def test_stacked_calls_hold_the_batches_of_single_steps(split, name):
  lengths = input_pipeline.call_lengths(2, 14, max_length=3, ends_every=(6,))
  assert lengths == [3, 1, 3, 3, 2]  # Steps 3-5, 6 | 7-9, 10-12 (both in epoch 1), 13-14.
  stacked = batches(name, split, 2, 14, lengths=lengths)
  single = batches(name, split, 2, 14)
  for a, b in zip(stacked, single, strict=True):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_call_lengths_end_at_every_boundary_and_never_exceed_the_maximum():
  lengths = input_pipeline.call_lengths(5, 50, max_length=7, ends_every=(4, 10))
  ends = np.cumsum([5] + lengths)[1:]
  assert sum(lengths) == 45 and max(lengths) <= 7
  assert set(range(8, 51, 4)) | set(range(10, 51, 10)) <= set(ends)
  assert input_pipeline.call_lengths(0, 3, max_length=1, ends_every=(10,)) == [1, 1, 1]
  assert input_pipeline.call_lengths(6, 6, max_length=4, ends_every=(2,)) == []


def test_a_call_across_an_epoch_end_is_refused(split):
  pipeline = input_pipeline.create_pipeline('device', split, BATCH, 0, distributed.create_mesh())
  with pytest.raises(ValueError, match='cross the end of epoch 0'):
    next(pipeline.train_batches(4, [3]))


def test_another_seed_gives_another_order(split):
  assert example_ids(batches('device', split, 0, 2, seed=1)) != example_ids(batches('device', split, 0, 2, seed=2))


def test_eval_batches_hold_every_example_once_with_a_mask(split):
  pipeline = input_pipeline.create_pipeline('tfdata', split, BATCH, 0, distributed.create_mesh())
  eval_batches = [jax.tree.map(np.asarray, b) for b in pipeline.eval_batches(split, 32)]
  assert [len(b['label']) for b in eval_batches] == [32, 32, 32, 32]
  mask = np.concatenate([b['mask'] for b in eval_batches])
  ids = np.concatenate([b['image'][:, 0, 0, 0] for b in eval_batches])[mask == 1]
  assert mask.sum() == NUM_EXAMPLES and ids.tolist() == list(range(NUM_EXAMPLES))
  assert pipeline.eval_batches(split, 32) is pipeline.eval_batches(split, 32)  # Kept on the devices.


def test_device_pipeline_and_augmentation_run_without_tensorflow():
  code = """
import sys
sys.modules['tensorflow'] = None  # Any import of TensorFlow now fails.
import functools, jax, numpy as np
from configs import default
from resnet_flax.data import augment, input_pipeline
from resnet_flax.run import distributed
from resnet_flax.data import ImageData
split = ImageData(np.zeros((64, 8, 8, 3), np.uint8), np.zeros(64, np.int32), ('a',))
pipeline = input_pipeline.create_pipeline('device', split, 16, 0, distributed.create_mesh())
batch = next(pipeline.train_batches(0, [1]))
augment_fn = functools.partial(augment.augment_batch, aug_config=default.get_config().augment,
                               mean=(0.5,) * 3, std=(0.25,) * 3, epoch=0, seed=0)
out = jax.jit(augment_fn)(batch['image'][0], jax.random.key(0), indices=batch['index'][0])
assert out.shape == (16, 8, 8, 3) and out.dtype == np.float32
print('ok')
"""
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
  assert result.stdout.strip() == 'ok', result.stderr
