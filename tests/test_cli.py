"""The command line's one-line errors and quiet library logs, as functions (main.py runs them end to end)."""

import logging
import types

import pytest

from configs import default
from resnet_flax import cli


def test_unknown_field_message_names_the_field_and_the_suggestion():
  config = default.get_config()
  config.lock()
  with pytest.raises(KeyError) as raised:  # What config_flags raises for --config.optim.learnin_rate.
    config.optim['learnin_rate']
  assert (
    cli.unknown_field_message(str(raised.value)) == "unknown config field 'learnin_rate'; did you mean 'learning_rate'?"
  )
  assert cli.unknown_field_message("'zzz'") == "unknown config field 'zzz'"


def test_where_it_failed_points_at_the_config_files_line(tmp_path):
  path = tmp_path / 'config.py'
  path.write_text('x = 1\ny = 1 / 0\n')
  with pytest.raises(ZeroDivisionError) as raised:
    exec(compile(path.read_text(), str(path), 'exec'), {})
  assert cli.where_it_failed(raised.value) == f'ZeroDivisionError: division by zero ({path}, line 2)'
  with pytest.raises(SyntaxError) as raised:
    compile('def f(:\n', str(path), 'exec')
  assert cli.where_it_failed(raised.value).startswith('SyntaxError: ') and f'({path}, line 1)' in cli.where_it_failed(
    raised.value
  )


def record(pathname: str, level: int, message: str, exc_info=None) -> logging.LogRecord:
  return logging.LogRecord('absl', level, pathname, 1, message, (), exc_info)


def test_orbax_logs_keep_warnings_without_tracebacks_only():
  orbax_file = '/site-packages/orbax/checkpoint/manager.py'
  assert not cli.keep_log_record(record(orbax_file, logging.INFO, 'saving step 5'))
  assert not cli.keep_log_record(
    record(orbax_file, logging.WARNING, 'Requested `tracked_metric`; did not provide metrics.')
  )
  failure = record(orbax_file, logging.ERROR, 'save failed', exc_info=(OSError, OSError('disk'), None))
  assert cli.keep_log_record(failure) and failure.exc_info is None
  assert cli.keep_log_record(record('/work/resnet_flax/train.py', logging.INFO, 'step 5'))


def test_library_callback_errors_are_logged_once_each(caplog):
  hook = cli.log_once_per_message()
  error = types.SimpleNamespace(exc_type=OSError, exc_value=OSError('No space left on device'))
  with caplog.at_level(logging.WARNING):
    for _ in range(3):
      hook(error)
    hook(types.SimpleNamespace(exc_type=ValueError, exc_value=ValueError('other')))
  messages = [r.getMessage() for r in caplog.records]
  assert messages == [
    'OSError: No space left on device (in a library callback; repeats are not logged)',
    'ValueError: other (in a library callback; repeats are not logged)',
  ]
