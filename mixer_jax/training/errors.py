"""The failures the programs report as a message, without a traceback.

`EXPECTED_ERRORS` is what train, evaluate, predict, fewshot, export and
benchmark catch: each of these errors says what to do. Anything else (a
plain ValueError from deep inside, say) is a bug and keeps its traceback
and a non-zero exit. Importing this module loads no TensorFlow.
"""

from mixer_jax.checkpointing import checkpoint_checks
from mixer_jax.data import errors as data_errors
from mixer_jax.training import config_validation
from mixer_jax.weights import hub_publish
from mixer_jax.weights import official_format
from mixer_jax.weights import registry


class NonFiniteLossError(FloatingPointError):
  """The training loss or gradient became NaN or infinite."""


class UsageError(ValueError):
  """A command-line flag or argument the program cannot use."""


EXPECTED_ERRORS = (config_validation.ConfigError, checkpoint_checks.CheckpointError,
                   NonFiniteLossError, UsageError,
                   data_errors.DatasetUnavailableError,
                   data_errors.BadImagesError, official_format.PretrainedError,
                   registry.CheckpointNotFoundError, hub_publish.PublishError)
