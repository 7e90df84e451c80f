"""The data errors a user can fix, without importing TensorFlow.

`mixer_jax.training.errors` lists them among the errors the programs report
in one line; defining them here (not in datasets/sources.py, which loads
TensorFlow and TFDS) keeps that list cheap to import for the programs that
read no data set (predict, export).
"""

from mixer_jax.errors import UserError


class DatasetUnavailableError(UserError, ValueError):
  """A data set is unknown, or is not prepared and cannot be prepared."""


class BadImagesError(UserError, ValueError):
  """Image files that cannot be decoded, with config.bad_images='error'."""


class FolderLayoutError(DatasetUnavailableError):
  """A folder data set whose folders would silently change the classes."""
