"""Errors that reach the user as one line (what is wrong and how to fix it), never a traceback."""

import errno


class UserError(Exception):
  """Base of every error caused by the user's config, data or workdir."""


class ConfigError(UserError, ValueError):
  """A config field has a bad value, or the config does not fit the workdir."""


class BudgetError(UserError):
  """The model has more trainable parameters than `model.max_params` allows."""


class NonFiniteError(UserError):
  """The loss or the gradients became NaN or infinite."""


class OutOfMemoryError(UserError):
  """The compiled steps need more memory than the devices have free (`train.memory`), or XLA ran out of it."""


class DiskFullError(UserError):
  """The disk filled while the run wrote its outputs (TensorBoard events); its checkpoints are intact."""


def is_disk_full(exc: BaseException | None) -> bool:
  """Whether `exc`, or an error it was raised from, is 'no space left on device' (raised by a library directly,
  or wrapped in its own error type)."""
  while exc is not None:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC or 'No space left on device' in str(exc):
      return True
    exc = exc.__cause__ or exc.__context__
  return False
