"""`UserError`: the base of every error a program reports in one line (each
subpackage's errors subclass it); anything else is a bug with a traceback."""


class UserError(Exception):
  """A mistake in the input (flag, config, file) that the message names."""
