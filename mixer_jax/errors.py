"""`UserError`: the base of every error a program reports in one line.

Each subpackage's own errors (ConfigError, CheckpointError, PretrainedError,
...) subclass it, so the programs catch one type without importing the
modules that raise it. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """A mistake in the input (flag, config, file) that the message names."""
