"""Trains or evaluates a compact ResNet.

  python main.py --config=configs/resnet34.py --workdir=runs/r34 [--config.field=value ...]
  python main.py --config=configs/resnet34.py --workdir=runs/r34 --mode=evaluate [--config.eval.tta=flip]
  python main.py --config=configs/resnet34.py --workdir=runs/r34 --mode=predict --predict_paths=a.png,dir/

Running the same command again resumes from the checkpoints in the workdir.
"""

import logging as std_logging
import os
import re
import sys
import traceback

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from resnet_flax import distributed, evaluate, train
from resnet_flax.errors import UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training configuration file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, TensorBoard events and reports.')
flags.DEFINE_enum('mode', 'train', ['train', 'evaluate', 'predict'], 'What to do with the workdir.')
flags.DEFINE_list('predict_paths', [], '--mode=predict: image files and folders, comma-separated.')
flags.DEFINE_integer('top_k', 5, '--mode=predict: how many classes to show per image.', lower_bound=1)
flags.DEFINE_string('predict_output', None, '--mode=predict: JSON output (default <workdir>/predictions.json).')
flags.DEFINE_string(
  'compilation_cache_dir',
  os.path.expanduser('~/.cache/resnet_flax/jax'),
  'Persistent XLA compilation cache: a resumed run skips compiling. Empty: off.',
)
flags.DEFINE_string('coordinator_address', None, 'Several processes: host:port of process 0.')
flags.DEFINE_integer('num_processes', None, 'Several processes: how many.')
flags.DEFINE_integer('process_id', None, 'Several processes: the index of this one.')
flags.mark_flags_as_required(['config', 'workdir'])


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with every mistake told in one line (a mistyped config field included)."""
  try:
    args = FLAGS(argv)
    FLAGS.config.keys()  # A config file that failed to load raises only when first used.
    return args
  except flags.Error as e:  # Its message may hold a config file's traceback: the first and last lines tell.
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    sys.exit(f'error: {lines[0]}' if len(lines) == 1 else f'error: {lines[0]} {lines[-1]}')
  except (AttributeError, KeyError) as e:  # config_flags: no such field.
    sys.exit(f'error: {unknown_field_message(str(e))} (configs/default.py lists every field)')
  except OSError as e:  # config_flags: the config file cannot be read.
    sys.exit(f'error: cannot load the --config file: {str(e).splitlines()[-1].strip()}')
  except Exception as e:  # The config file itself raised.
    sys.exit(f'error: the --config file failed to load: {where_it_failed(e)}; fix the file')


def where_it_failed(e: Exception) -> str:
  """`Type: message (file, line N)`, N being where a config file raised `e`."""
  if isinstance(e, SyntaxError):
    return f'{type(e).__name__}: {e.msg} ({e.filename}, line {e.lineno})'
  frame = traceback.extract_tb(e.__traceback__)[-1]
  return f'{type(e).__name__}: {e} ({frame.filename}, line {frame.lineno})'


def unknown_field_message(text: str) -> str:
  field, suggestion = re.search(r'(\w+)', text), re.search(r'Did you mean "(\w+)"', text)
  message = f'unknown config field {field.group(1)!r}' if field else f'unknown config field: {text}'
  return f'{message}; did you mean {suggestion.group(1)!r}?' if suggestion else message


def quiet_library_logs():
  """Orbax logs every step of every save at INFO, and warns on each save made between evaluations
  that it got no metrics (by design here): keep its other warnings and errors only, as one line each.
  A failed save makes Orbax log, and tensorstore's callbacks print, a traceback per array: the trainer
  turns the failure into one clear error, so here they are one log line each (each callback error once)."""

  def keep(record: std_logging.LogRecord) -> bool:
    if '/orbax/' not in record.pathname:
      return True
    record.exc_info, record.exc_text = None, None
    return record.levelno >= std_logging.WARNING and 'did not provide metrics' not in record.getMessage()

  logging.get_absl_handler().python_handler.addFilter(keep)

  seen = set()

  def one_line_once(unraisable):  # sys.unraisablehook: how tensorstore's callbacks report their errors.
    message = f'{unraisable.exc_type.__name__}: {unraisable.exc_value}'
    if message not in seen:
      seen.add(message)
      logging.warning('%s (in a library callback; repeats are not logged)', message)

  sys.unraisablehook = one_line_once


def exit_with_error(message: str):
  """Prints `message` as the last line and exits 1: what library threads print while the process
  shuts down (about the same failure) goes nowhere, so the error stays the last thing a user sees."""
  print(f'error: {" ".join(message.split())}', file=sys.stderr, flush=True)
  sys.stdout.flush()
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, sys.stdout.fileno())
  os.dup2(devnull, sys.stderr.fileno())
  sys.exit(1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  quiet_library_logs()
  if FLAGS.compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', FLAGS.compilation_cache_dir)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  try:
    if FLAGS.mode == 'train':
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == 'evaluate':
      evaluate.evaluate_checkpoint(FLAGS.config, FLAGS.workdir)
    else:
      evaluate.run_predict(FLAGS.config, FLAGS.workdir, FLAGS.predict_paths, FLAGS.top_k, FLAGS.predict_output)
  except UserError as e:
    exit_with_error(str(e))  # One line, whatever a library put in the message.


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
