"""Property tests: every bad config value or data file gets one clear line, never a traceback."""

import os

import hypothesis
import hypothesis.strategies as st
import pytest

from configs import smoke
from resnet_flax.data import DataError, folder
from resnet_flax.errors import UserError
from resnet_flax.train import config_checks, trainer

VALUES = st.one_of(
  st.integers(-(10**6), 10**6),
  st.floats(allow_nan=True, allow_infinity=True),
  st.text(max_size=8),
  st.booleans(),
  st.none(),
  st.tuples(st.text(max_size=6)),
)
SETTINGS = hypothesis.settings(
  max_examples=60, deadline=None, suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture]
)


def with_value(field: str, value):
  config = smoke.get_config()
  *parents, name = field.split('.')
  node = config
  for parent in parents:
    node = node[parent]
  try:
    node[name] = value
  except (TypeError, ValueError):  # ConfigDict keeps field types, as the command line does.
    hypothesis.assume(False)
  return config


@SETTINGS
@hypothesis.given(field=st.sampled_from(sorted(config_checks.RULES)), value=VALUES)
def test_any_config_value_is_accepted_or_refused_in_one_line(field, value):
  config = with_value(field, value)
  try:
    config_checks.validate(config)
  except UserError as e:
    assert '\n' not in str(e) and str(e).startswith('--config.')


@SETTINGS
@hypothesis.given(field=st.sampled_from(sorted(config_checks.RULES)), value=VALUES)
def test_a_refused_config_leaves_no_workdir(tmp_path, field, value):
  config = with_value(field, value)
  try:
    config_checks.validate(config)
  except UserError:
    workdir = tmp_path / f'run_{abs(hash((field, repr(value))))}'
    with pytest.raises(UserError):
      trainer.train_and_evaluate(config, str(workdir))
    assert not workdir.exists()
  else:
    hypothesis.assume(False)


@SETTINGS
@hypothesis.given(content=st.binary(max_size=200), extension=st.sampled_from(['.png', '.jpg', '.JPEG']))
def test_any_undecodable_image_file_is_a_one_line_data_error(tmp_path, content, extension):
  root = tmp_path / f'data_{abs(hash((content, extension)))}'
  for split in ('train', 'test'):
    os.makedirs(root / split / 'cat')
    (root / split / 'cat' / f'bad{extension}').write_bytes(content)
  config = smoke.get_config().data
  config.path, config.cache_dir = str(root), str(tmp_path / 'cache')
  with pytest.raises(DataError) as error:
    folder.load(config)
  assert '\n' not in str(error.value) and 'bad' in str(error.value)
