"""Fine-tuning from another run (`init_from`) and the linear probe (`optim.freeze='backbone'`).

The source is the shared smoke run (`straight_run`: 10 synthetic classes, 32x32 images, resnet_tiny).
"""

import json
import logging
import shutil

import flax
import jax
import numpy as np
import pytest

from configs import smoke
from resnet_flax import data, models
from resnet_flax.errors import ConfigError
from resnet_flax.run.workdir import RunInfo
from resnet_flax.train import config_checks, finetune, trainer

from helpers import finished_steps, load_checkpoint, run_main, tiny_run_info

HEAD = ('params', models.HEAD)
PROBE = {'optim.freeze': 'backbone', 'data.synthetic_image_size': 24}  # On larger images than the source's.
NORMALISATION = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))  # This run's own, which a fine-tune replaces.


def finetune_config(init_from, **fields):
  """The smoke config for one epoch (8 steps) from `init_from`; `fields` are dotted config fields."""
  config = smoke.get_config()
  config.init_from, config.num_epochs = str(init_from), 1.0
  for field, value in fields.items():
    *parents, name = field.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[name] = value
  return config


def fresh_variables(config, num_classes: int | None = None):
  """Stand-ins for the variables `train_and_evaluate` initialises for `config` (their structure, random
  values: compiling the initialisation takes 10+ s on 2 busy cores), and its class names."""
  train_split = data.load_splits(config.data)['train']
  model = models.create_model_from_config(config, num_classes or len(train_split.class_names))
  rng = np.random.default_rng(0)
  shapes = models.init_variables(model, train_split.images.shape[1:])
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes), train_split.class_names


def leaves(variables) -> dict:
  return flax.traverse_util.flatten_dict({k: variables[k] for k in ('params', 'batch_stats')})


@pytest.mark.parametrize(
  'where, fields',
  [
    ('workdir', {'init_from_checkpoint': 'latest'}),
    ('checkpoint_dir', {}),
    ('workdir', {'init_from_checkpoint': 'latest', 'data.synthetic_image_size': 16}),  # Convs take any size.
  ],
  ids=['workdir', 'checkpoint_dir', 'smaller_images'],
)
def test_same_classes_start_from_exactly_the_source_weights(straight_run, tmp_path, where, fields):
  step = finished_steps(straight_run)[-1]
  source = straight_run if where == 'workdir' else straight_run / 'checkpoints' / str(step)
  config = finetune_config(source, **fields)
  variables, class_names = fresh_variables(config)
  start = finetune.apply_init_from(config, str(tmp_path), variables, class_names, *NORMALISATION)

  saved = leaves(load_checkpoint(straight_run, step))
  started = leaves(start.variables)
  assert started.keys() == saved.keys()
  for path, value in started.items():
    np.testing.assert_array_equal(value, saved[path], err_msg='/'.join(path))
  source_run = json.loads((straight_run / 'run.json').read_text())
  assert (start.pixel_mean, start.pixel_std) == (tuple(source_run['pixel_mean']), tuple(source_run['pixel_std']))
  assert start.init_from == {'path': str(straight_run), 'step': step}


def test_other_classes_keep_the_rows_of_the_shared_ones(straight_run, tmp_path, caplog):
  config = finetune_config(straight_run)
  classes = ('class_7', 'zebra', 'class_0', 'class_3')  # Fewer, reordered, and one the source lacks.
  variables, _ = fresh_variables(config, num_classes=len(classes))
  with caplog.at_level(logging.INFO):
    start = finetune.apply_init_from(config, str(tmp_path), variables, classes, *NORMALISATION)

  saved, fresh, started = (
    leaves(load_checkpoint(straight_run, start.init_from['step'])),
    leaves(variables),
    leaves(start.variables),
  )
  for name in ('kernel', 'bias'):
    path = (*HEAD, name)
    assert started[path].shape[-1] == len(classes)
    for ours, theirs in ((0, 7), (2, 0), (3, 3)):
      np.testing.assert_array_equal(started[path][..., ours], saved[path][..., theirs])
    np.testing.assert_array_equal(started[path][..., 1], fresh[path][..., 1])
  for path, value in started.items():
    if path[:2] != HEAD:
      np.testing.assert_array_equal(value, saved[path], err_msg='/'.join(path))
  features = saved[(*HEAD, 'kernel')].shape[0]
  assert f're-initialised {features + 1:,} (the classifier weights of 1 classes new to this run)' in caplog.text
  assert '7 of its classes are dropped' in caplog.text


@pytest.fixture(scope='module')
def probe_run(straight_run, tmp_path_factory):
  """A linear probe of the source: 8 steps that train only the classifier."""
  workdir = tmp_path_factory.mktemp('probe')
  trainer.train_and_evaluate(finetune_config(straight_run, **PROBE), str(workdir))
  return workdir


def test_linear_probe_moves_the_head_and_nothing_else(straight_run, probe_run):
  workdir = probe_run
  run = json.loads((workdir / 'run.json').read_text())
  source_run = json.loads((straight_run / 'run.json').read_text())
  assert run['init_from']['path'] == str(straight_run)
  assert run['image_shape'] == [24, 24, 3] and run['pixel_mean'] == source_run['pixel_mean']
  assert finished_steps(workdir)[-1] == 8

  source = leaves(load_checkpoint(straight_run, run['init_from']['step']))
  trained = leaves(load_checkpoint(workdir, 8))
  assert trained.keys() == source.keys()
  for path, value in trained.items():
    if path[:2] == HEAD:
      assert not np.array_equal(value, source[path]), path
    else:  # The backbone's parameters (weight decay included) and every BatchNorm statistic.
      np.testing.assert_array_equal(value, source[path], err_msg='/'.join(path))


def test_a_resumed_fine_tune_keeps_its_checkpoints_and_normalisation(probe_run, caplog):
  workdir = probe_run
  config = finetune_config(workdir / 'gone', **PROBE)  # A resume never reads the source again.
  variables, class_names = fresh_variables(config)
  with caplog.at_level(logging.INFO):
    start = finetune.apply_init_from(config, str(workdir), variables, class_names, *NORMALISATION)
  run = json.loads((workdir / 'run.json').read_text())
  assert start.variables is variables  # The train state is restored from the checkpoint afterwards.
  assert (start.pixel_mean, start.pixel_std) == (tuple(run['pixel_mean']), tuple(run['pixel_std']))
  assert start.init_from == run['init_from']
  assert 'is not applied again (the checkpoint wins)' in caplog.text


def without_checkpoints(straight_run, tmp_path):
  for name in ('run.json', 'config.json'):
    shutil.copy(straight_run / name, tmp_path / name)
  return tmp_path


@pytest.mark.parametrize(
  'init_from, fields, message',
  [
    (lambda run, tmp: tmp / 'missing', {}, r"init_from='.*missing' does not exist: point it at a trained run's"),
    (lambda run, tmp: tmp, {}, r'holds no trained run \(no run.json in or above it\)'),
    (without_checkpoints, {}, r'has no checkpoint; train it first'),
    (lambda run, tmp: run, {'init_from_checkpoint': '7'}, r'no checkpoint of step 7 .* --config.init_from_checkpoint$'),
    (
      lambda run, tmp: run,
      {'model.stem': 'imagenet'},
      r"another architecture \(model.name 'resnet_tiny' there, 'resnet_tiny' here\): params/stem_conv/kernel "
      r'is of shape \(3, 3, 3, 16\) there and of shape \(7, 7, 3, 16\) here',
    ),
  ],
  ids=['missing', 'not_a_run', 'no_checkpoints', 'unknown_step', 'other_architecture'],
)
def test_a_bad_source_is_one_line(straight_run, tmp_path, init_from, fields, message):
  source = tmp_path / 'source'
  source.mkdir()
  config = finetune_config(init_from(straight_run, source), **fields)
  variables, class_names = fresh_variables(config)
  with pytest.raises(ConfigError, match=message) as error:
    finetune.apply_init_from(config, str(tmp_path / 'workdir'), variables, class_names, *NORMALISATION)
  assert '\n' not in str(error.value)


def test_a_missing_source_stops_the_command_before_any_training(tmp_path):
  returncode, output = run_main(tmp_path / 'run', f'--config.init_from={tmp_path}/missing')
  assert returncode == 1 and not finished_steps(tmp_path / 'run')
  assert output.strip().splitlines()[-1] == (
    f"error: --config.init_from='{tmp_path}/missing' does not exist: point it at a trained run's workdir or one "
    'of its checkpoints (<workdir>/checkpoints/<step>)'
  )


def test_config_rules():
  config_checks.validate(finetune_config('', **{'optim.freeze': 'backbone', 'init_from_checkpoint': '120'}))
  for fields, message in (
    ({'optim.freeze': 'head'}, r"optim.freeze='head' is invalid: choose one of none, backbone"),
    ({'init_from_checkpoint': 'newest'}, r'init_from_checkpoint=.* choose best, latest or a step number'),
    ({'optim.freeze': 'backbone', 'model.drop_path_rate': 0.1}, r'does nothing with optim.freeze=backbone'),
  ):
    with pytest.raises(ConfigError, match=message):
      config_checks.validate(finetune_config('', **fields))


def test_run_json_records_the_source_outside_the_resume_fingerprint():
  info = tiny_run_info(init_from={'path': '/r', 'step': 4})
  saved = info.to_json()
  assert RunInfo.from_json(saved) == info and 'init_from' not in info.resume_fingerprint()
  del saved['init_from']  # The run.json of earlier versions.
  assert RunInfo.from_json(saved).init_from is None


@pytest.mark.parametrize('name', ['resnet_tiny', 'wrn16_4', 'densenet_bc100_k12'])
def test_head_is_the_classifier_of_each_architecture(name):
  params = models.init_variables(models.create_model(name, 7), (32, 32, 3))['params']
  assert params[models.HEAD]['kernel'].shape[-1] == params[models.HEAD]['bias'].shape[-1] == 7
