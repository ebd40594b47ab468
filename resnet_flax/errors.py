"""Errors that reach the user as one line (what is wrong and how to fix it), never a traceback."""


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
