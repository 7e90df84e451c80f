"""The data errors a user can fix, defined without TensorFlow so that the
programs that read no data set (predict, export) list them cheaply."""

from mixer_jax.errors import UserError


class DatasetUnavailableError(UserError, ValueError):
  """A data set is unknown, or is not prepared and cannot be prepared."""


class BadImagesError(UserError, ValueError):
  """Image files that cannot be decoded, with config.bad_images='error'."""


class FolderLayoutError(DatasetUnavailableError):
  """A folder data set whose folders would silently change the classes."""
