"""The user errors of training and of the programs' command lines."""

from mixer_jax.errors import UserError


class NonFiniteLossError(UserError, FloatingPointError):
  """The training loss or gradient became NaN or infinite."""


class UsageError(UserError, ValueError):
  """A command-line flag or argument the program cannot use."""
