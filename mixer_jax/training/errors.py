"""The failures the programs report as a message, without a traceback.

`EXPECTED_ERRORS` is what train, evaluate, predict, fewshot and export
catch: each of these errors says what to do. Anything else is a bug and
keeps its traceback.
"""

from mixer_jax.checkpointing import checkpoint_checks
from mixer_jax.data.datasets import sources
from mixer_jax.training import config_validation
from mixer_jax.weights import official_format
from mixer_jax.weights import registry


class NonFiniteLossError(FloatingPointError):
  """The training loss or gradient became NaN or infinite."""


EXPECTED_ERRORS = (config_validation.ConfigError, checkpoint_checks.CheckpointError,
                   NonFiniteLossError, sources.DatasetUnavailableError,
                   sources.BadImagesError, official_format.PretrainedError,
                   registry.CheckpointNotFoundError)
