"""The command line's manners: every mistake is one line saying what to fix, libraries' noise stays
out of the way, and the error is the last thing a user sees. `main.py` only defines flags and modes."""

from __future__ import annotations

import logging as std_logging
import os
import re
import sys
import traceback
from collections.abc import Callable

import jax
from absl import flags, logging

from resnet_flax.errors import UserError, is_disk_full
from resnet_flax.run import distributed
from resnet_flax.train import memory


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with every mistake told in one line (a mistyped config field included)."""
  try:
    args = flags.FLAGS([with_fractions(arg) for arg in argv])
    if run_config() is not None:  # Optional where another flag replaces it (a sweep's --report); absent: serve.
      flags.FLAGS.config.keys()  # A config file that failed to load raises only when first used.
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


def with_fractions(arg: str) -> str:
  """`--config.eval.epsilon=8/255` as `--config.eval.epsilon=0.03137...`: attack radii and step sizes
  (the fields ending in `epsilon` or `step_size`) are written as fractions of 255 in papers and tables."""
  match = re.fullmatch(r'(--config\.[\w.]*(?:epsilon|step_size))=(\d+(?:\.\d*)?)/(\d+(?:\.\d*)?)', arg)
  if match is None or float(match[3]) == 0:
    return arg
  return f'{match[1]}={float(match[2]) / float(match[3])!r}'


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


def keep_log_record(record: std_logging.LogRecord) -> bool:
  """Orbax logs every step of every save at INFO, and warns on each save made between evaluations that
  it got no metrics (by design here): keep its other warnings and errors only, without tracebacks (a
  failed save logs one per array; the trainer turns the failure into one clear error)."""
  if '/orbax/' not in record.pathname:
    return True
  record.exc_info, record.exc_text = None, None
  return record.levelno >= std_logging.WARNING and 'did not provide metrics' not in record.getMessage()


def log_once_per_message() -> Callable:
  """A `sys.unraisablehook` (how tensorstore's callbacks report their errors, a traceback each) that
  logs each distinct error once, in one line."""
  seen = set()

  def hook(unraisable):
    message = f'{unraisable.exc_type.__name__}: {unraisable.exc_value}'
    if message not in seen:
      seen.add(message)
      logging.warning('%s (in a library callback; repeats are not logged)', message)

  return hook


def quiet_library_logs() -> None:
  logging.get_absl_handler().python_handler.addFilter(keep_log_record)
  sys.unraisablehook = log_once_per_message()


def exit_with_error(message: str):
  """Prints `message` as the last line and exits 1: what library threads print while the process
  shuts down (about the same failure) goes nowhere, so the error stays the last thing a user sees."""
  std_logging.disable(std_logging.CRITICAL)  # Also records logged between this print and the redirection.
  sys.unraisablehook = lambda unraisable: None
  print(f'error: {" ".join(message.split())}', file=sys.stderr, flush=True)
  sys.stdout.flush()
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, sys.stdout.fileno())
  os.dup2(devnull, sys.stderr.fileno())
  sys.exit(1)


JOB_FLAGS = ('compilation_cache_dir', 'coordinator_address', 'num_processes', 'process_id')


def define_job_flags() -> None:
  """The flags of a job rather than of a mode: the persistent compilation cache, and the rendezvous of
  several processes (`distributed.initialize`)."""
  flags.DEFINE_string(
    'compilation_cache_dir',
    os.path.expanduser('~/.cache/resnet_flax/jax'),
    'Persistent XLA compilation cache: a resumed run skips compiling. Empty: off.',
  )
  flags.DEFINE_string('coordinator_address', None, 'Several processes: host:port of process 0.')
  flags.DEFINE_integer('num_processes', None, 'Several processes: how many.')
  flags.DEFINE_integer('process_id', None, 'Several processes: the index of this one.')


def job_settings() -> dict[str, object]:
  """The values of `define_job_flags`' flags, as `run` takes them."""
  return {name: flags.FLAGS[name].value for name in JOB_FLAGS}


def set_compilation_cache(directory: str) -> None:
  """Persistent XLA compilation cache in `directory` ('' turns it off): a resumed run skips compiling."""
  if directory:
    jax.config.update('jax_compilation_cache_dir', directory)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


def run(
  mode: Callable[[], object],
  compilation_cache_dir: str,
  coordinator_address: str | None,
  num_processes: int | None,
  process_id: int | None,
) -> None:
  """Runs `mode` in this process of the job; a UserError, XLA running out of memory, or a full disk met by any
  library's writer (TensorBoard's events, an export) ends the process with its one line."""
  quiet_library_logs()
  set_compilation_cache(compilation_cache_dir)
  distributed.initialize(coordinator_address, num_processes, process_id)
  try:
    mode()
  except UserError as e:
    exit_with_error(str(e))  # One line, whatever a library put in the message.
  except jax.errors.JaxRuntimeError as e:  # XLA's RESOURCE_EXHAUSTED, at compile or at run time.
    message = memory.out_of_memory_message(e, run_config())
    if message is None:
      raise
    exit_with_error(message)
  except Exception as e:
    if not is_disk_full(e):
      raise
    exit_with_error(  # Checkpoints are written whole or not at all: the last one listed is intact.
      f'no space left on the device ({type(e).__name__}); free some space and rerun the same command to resume'
    )


def run_config():
  """The --config of this command (an ml_collections.ConfigDict), where it has one."""
  return flags.FLAGS['config'].value if 'config' in flags.FLAGS else None
