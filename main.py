"""Trains or evaluates a compact ResNet.

  python main.py --config=configs/resnet34.py --workdir=runs/r34 [--config.field=value ...]

Running the same command again resumes from the checkpoints in the workdir.
"""

import logging as std_logging
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from resnet_flax import train
from resnet_flax.errors import UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training configuration file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, TensorBoard events and reports.')
flags.DEFINE_enum('mode', 'train', ['train'], 'What to do with the workdir.')
flags.mark_flags_as_required(['config', 'workdir'])


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with every mistake told in one line (a mistyped config field included)."""
  try:
    args = FLAGS(argv)
    FLAGS.config.keys()  # A config file that failed to load raises only when first used.
    return args
  except flags.Error as e:
    sys.exit(f'error: {e}')
  except (AttributeError, KeyError) as e:  # config_flags: no such field.
    sys.exit(f'error: {unknown_field_message(str(e))} (configs/default.py lists every field)')
  except OSError as e:
    sys.exit(f'error: {" ".join(str(e).split())}')


def unknown_field_message(text: str) -> str:
  field, suggestion = re.search(r"(\w+)", text), re.search(r'Did you mean "(\w+)"', text)
  message = f'unknown config field {field.group(1)!r}' if field else f'unknown config field: {text}'
  return f'{message}; did you mean {suggestion.group(1)!r}?' if suggestion else message


def quiet_library_info_logs():
  """Orbax logs every step of every save at INFO; keep its warnings and errors only."""
  library_info = lambda record: record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname
  logging.get_absl_handler().python_handler.addFilter(library_info)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  quiet_library_info_logs()
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except UserError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
