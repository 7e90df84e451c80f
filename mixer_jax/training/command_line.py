"""What every mixer_jax program does alike: quiet output, one-line errors.

Order: flags (`parse_known_flags` or `config_loading.parse_flags`), then
TensorFlow (`load_tensorflow_quietly`) and JAX, then `start_multihost`.
TensorFlow logs as it loads, so `--verbose` is read from sys.argv at import.
"""

import contextlib
import logging as pylogging
import os
import sys
import tempfile
from typing import List, Sequence

from absl import flags
from absl import logging

from mixer_jax.checkpointing import echoes
from mixer_jax.errors import UserError
from mixer_jax.training import errors

# Libraries whose INFO lines (and, by default, warnings) are dropped.
NOISY_LIBRARIES = ('orbax', 'etils', 'tensorflow_datasets', 'clu')
_NOISY_PATHS = tuple(os.sep + name + os.sep for name in NOISY_LIBRARIES)
_VERBOSE_FLAGS = ('--verbose', '--verbose=true', '--verbose=True',
                  '--verbose=1')


def asks_verbose(argv: Sequence[str]) -> bool:
  return any(arg in _VERBOSE_FLAGS for arg in argv[1:])


if not asks_verbose(sys.argv):
  # 2: TensorFlow's C++ INFO and WARNING lines off (the Google Cloud
  # authentication warnings of every `gs://` access among them). Raised, not
  # defaulted: importing JAX, which the package does first, sets it to 1.
  os.environ['TF_CPP_MIN_LOG_LEVEL'] = str(
      max(2, int(os.environ.get('TF_CPP_MIN_LOG_LEVEL', '0') or 0)))


def load_tensorflow_quietly() -> None:
  """Imports TensorFlow on the CPU (JAX keeps the accelerators' memory).

  Its C++ start-up lines escape TF_CPP_MIN_LOG_LEVEL, so the import writes
  file descriptor 2 to a temporary file, shown only if it fails.
  """
  if 'tensorflow' not in sys.modules and not asks_verbose(sys.argv):
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
      os.dup2(captured.fileno(), 2)
      try:
        import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
      except BaseException as e:
        os.dup2(saved, 2)
        captured.seek(0)
        sys.stderr.write(captured.read().decode('utf-8', 'replace'))
        if isinstance(e, ModuleNotFoundError) and e.name == 'tensorflow':
          raise errors.UsageError(
              "TensorFlow is not installed (it reads data and weight files): "
              "pip install 'mixer_jax[tf]'. Nothing was written.") from None
        raise
      finally:
        os.dup2(saved, 2)
        os.close(saved)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:
    pass  # TensorFlow has already used a GPU; it cannot be hidden any more.


def define_checkpoint_flags() -> None:
  """The flags of the programs that read a checkpoint (`any_checkpoint`)."""
  flags.DEFINE_string('checkpoint', None, 'Workdir, registry or hf-hub: '
                      'name, .npz or .safetensors.', required=True)
  flags.DEFINE_integer('step', None, 'Step of a workdir (default: newest).')
  flags.DEFINE_enum('weights', 'params', ['params', 'ema'],
                    "A workdir's trained weights, or their EMA.")


def define_verbose_flag() -> None:
  flags.DEFINE_bool('verbose', False, 'Also show INFO logs and the logs of '
                    'the libraries (JAX, Orbax, TFDS, TensorFlow) on stderr.')


def _from_noisy_library(record) -> bool:
  """Whether a record was logged by a noisy library's code: they all log
  through absl's logger, so only the source path tells them apart."""
  return any(part in record.pathname for part in _NOISY_PATHS)


class DropLibraryLogs(pylogging.Filter):
  """Drops records up to `max_level` logged from inside noisy libraries."""

  def __init__(self, max_level: int = pylogging.INFO):
    super().__init__()
    self.max_level = max_level

  def filter(self, record):
    return record.levelno > self.max_level or not _from_noisy_library(record)


def _short_library_errors(record) -> bool:
  """Cuts library errors to their first line (Orbax logs each failed
  background write with its traceback before our CheckpointError)."""
  if record.levelno >= pylogging.ERROR and _from_noisy_library(record):
    text = record.getMessage().strip().split('\n', 1)[0]
    record.msg, record.args = text[:300], None
    record.exc_info, record.exc_text, record.stack_info = None, None, None
  return True


def quiet_library_logs(max_level: int = pylogging.INFO) -> None:
  """Drops library records up to `max_level` (Orbax per save, TFDS per
  pass); library errors in one line. Calling it again replaces the level."""
  handler = logging.get_absl_handler()
  for old in [f for f in handler.filters if isinstance(f, DropLibraryLogs)]:
    handler.removeFilter(old)
  handler.addFilter(DropLibraryLogs(max_level))
  pylogging.getLogger('absl').addFilter(_short_library_errors)  # Once.
  echoes.quiet_closed_loop_echoes()


def set_up_output(verbose: bool) -> None:
  # huggingface_hub prints its records (download retries) with a handler of
  # its own and also passes them on to absl's: shown twice.
  pylogging.getLogger('huggingface_hub').propagate = False
  if verbose:
    logging.set_verbosity(logging.INFO)
    return
  # Also hides JAX's INFO "Unable to initialize backend" lines.
  logging.set_verbosity(logging.WARNING)
  quiet_library_logs(pylogging.WARNING)
  # Warnings and errors as 'WARNING: text', without absl's prefix of date,
  # thread id and source line (which --verbose keeps).
  logging.get_absl_handler().setFormatter(
      pylogging.Formatter('%(levelname)s: %(message)s'))


def one_line(error: BaseException) -> str:
  return f'{type(error).__name__}: {error}'


@contextlib.contextmanager
def user_errors_as_one_line(prefix: str = ''):
  """A `UserError` ends the program in one line (exit 1); any other
  exception is a bug and keeps its traceback."""
  try:
    yield
  except UserError as e:
    raise SystemExit(prefix + one_line(e)) from None


def absl_flags_error(error: flags.Error) -> SystemExit:
  return SystemExit(f'FATAL Flags parsing error: {error}\nPass --helpshort '
                    'or --helpfull to see help on flags.')


def parse_known_flags(argv: Sequence[str]) -> List[str]:
  """`flags_parser` for `absl.app.run` leaving unknown (multi-host) flags."""
  try:
    return flags.FLAGS(argv, known_only=True)
  except flags.Error as e:
    raise absl_flags_error(e) from None


def start_multihost(argv: Sequence[str]) -> None:
  """Reads the multi-host flags left in `argv` (UsageError for any other
  argument) and starts jax.distributed if they ask for it."""
  from mixer_jax.training import sharding  # pylint: disable=g-import-not-at-top
  sharding.define_multihost_flags()
  try:
    argv = flags.FLAGS(argv)
  except flags.Error as e:
    raise absl_flags_error(e) from None
  if len(argv) > 1:
    raise errors.UsageError(f'Unexpected arguments: {argv[1:]}; flags are '
                            '--NAME=VALUE, config fields --config.FIELD=VALUE.')
  sharding.initialize_from_flags()
