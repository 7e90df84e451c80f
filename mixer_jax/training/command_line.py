"""What every mixer_jax program does alike: quiet output, one-line errors.

- Output: the answer (and train's progress and summary) goes to stdout.
  Library noise is off by default: absl INFO logs (JAX's "Unable to
  initialize backend 'tpu'", Orbax's per-save notes, TFDS's per-pass notes)
  and library warnings are dropped, TensorFlow's C++ start-up lines too;
  library errors still show, as one line each. `--verbose` brings it all
  back, on stderr.
- Errors: the project's user errors (`mixer_jax.errors.UserError`) end
  the program with exit status 1 and one line naming the error; no `--help`
  is printed. Anything else is a bug and keeps its traceback.
- Order: flags first (`parse_known_flags`, or `config_loading.parse_flags`
  with a config), then TensorFlow (`load_tensorflow_quietly`) and JAX, then
  the multi-host flags, which are defined with JAX (`start_multihost`).
  TensorFlow logs when it loads, so `--verbose` is looked for in sys.argv
  when this module is imported.
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

# Libraries whose INFO lines (and, by default, warnings) are dropped.
NOISY_LIBRARIES = ('orbax', 'etils', 'tensorflow_datasets', 'clu')
_NOISY_PATHS = tuple(os.sep + name + os.sep for name in NOISY_LIBRARIES)
_VERBOSE_FLAGS = ('--verbose', '--verbose=true', '--verbose=True',
                  '--verbose=1')


def asks_verbose(argv: Sequence[str]) -> bool:
  """Whether the command line turns --verbose on (before flags are parsed)."""
  return any(arg in _VERBOSE_FLAGS for arg in argv[1:])


if not asks_verbose(sys.argv):
  # 2: TensorFlow's C++ INFO and WARNING lines off (the Google Cloud
  # authentication warnings of every `gs://` access among them). Raised, not
  # defaulted: importing JAX, which the package does first, sets it to 1.
  os.environ['TF_CPP_MIN_LOG_LEVEL'] = str(
      max(2, int(os.environ.get('TF_CPP_MIN_LOG_LEVEL', '0') or 0)))


def load_tensorflow_quietly() -> None:
  """Imports TensorFlow, its C++ start-up lines kept off stderr, on the CPU.

  TensorFlow's C++ code logs through absl before absl's logging is set up
  ("All log messages before absl::InitializeLog() ...", the oneDNN note),
  and TF_CPP_MIN_LOG_LEVEL does not reach those lines, so the import runs
  with file descriptor 2 pointed at a temporary file. What it wrote is
  replayed when --verbose is given or the import fails. For the programs
  that read data sets; call it before anything else imports TensorFlow.

  TensorFlow only reads and preprocesses data in these programs (JAX
  computes), so its GPUs are hidden from it: it then takes no accelerator
  memory from JAX.
  """
  if 'tensorflow' not in sys.modules and not asks_verbose(sys.argv):
    _import_with_stderr_captured()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:
    pass  # TensorFlow has already used a GPU; it cannot be hidden any more.


def _import_with_stderr_captured() -> None:
  """Imports TensorFlow with file descriptor 2 pointed at a temporary file."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
    except BaseException:
      os.dup2(saved, 2)
      captured.seek(0)
      sys.stderr.write(captured.read().decode('utf-8', 'replace'))
      raise
    finally:
      os.dup2(saved, 2)
      os.close(saved)


def define_verbose_flag() -> None:
  flags.DEFINE_bool('verbose', False, 'Also show INFO logs and the logs of '
                    'the libraries (JAX, Orbax, TFDS, TensorFlow) on stderr.')


def _from_noisy_library(record) -> bool:
  """Whether a log record comes from the code of a noisy library.

  Keyed on the file path of the logging code: these libraries log through
  absl's logger (named 'absl', whatever the library), and no public API
  says which library a record came from. The one place that reads paths.
  """
  return any(part in record.pathname for part in _NOISY_PATHS)


class DropLibraryLogs(pylogging.Filter):
  """Drops records up to `max_level` logged from inside noisy libraries."""

  def __init__(self, max_level: int = pylogging.INFO):
    super().__init__()
    self.max_level = max_level

  def filter(self, record):
    return record.levelno > self.max_level or not _from_noisy_library(record)


class ShortLibraryErrors(pylogging.Filter):
  """Cuts library errors to their first line, without the traceback.

  Orbax logs each failed background write several times with the full
  traceback before our own `CheckpointError` says what failed and what is
  kept; one line of each is enough.
  """

  def filter(self, record):
    if record.levelno >= pylogging.ERROR and _from_noisy_library(record):
      text = record.getMessage().strip().split('\n', 1)[0]
      record.msg, record.args = text[:300], None
      record.exc_info, record.exc_text, record.stack_info = None, None, None
    return True


def quiet_library_logs(max_level: int = pylogging.INFO) -> None:
  """Drops library records up to `max_level`; library errors in one line.

  Orbax (per save), TFDS (per eval pass) and clu (a copy of every metric,
  also in metrics.jsonl and TensorBoard) log through absl like this package,
  so the level cannot be lowered for them alone; a filter on the absl
  handler drops their records by source file. Calling it again replaces
  the level.
  """
  handler = logging.get_absl_handler()
  for old in [f for f in handler.filters if isinstance(f, DropLibraryLogs)]:
    handler.removeFilter(old)
  handler.addFilter(DropLibraryLogs(max_level))
  logger = pylogging.getLogger('absl')
  if not any(isinstance(f, ShortLibraryErrors) for f in logger.filters):
    logger.addFilter(ShortLibraryErrors())
  echoes.quiet_closed_loop_echoes()


def set_up_output(verbose: bool) -> None:
  """Quiet (default) or verbose logs on stderr; see the module docstring."""
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
  """'ErrorType: message' of a user error."""
  return f'{type(error).__name__}: {error}'


@contextlib.contextmanager
def user_errors_as_one_line(prefix: str = ''):
  """Ends the program with `prefix` + `one_line(e)` (exit 1) for a
  `UserError`; any other exception is a bug and keeps its traceback."""
  try:
    yield
  except UserError as e:
    raise SystemExit(prefix + one_line(e)) from None


def absl_flags_error(error: flags.Error) -> SystemExit:
  """absl's own report of a flag it refuses."""
  return SystemExit(f'FATAL Flags parsing error: {error}\nPass --helpshort '
                    'or --helpfull to see help on flags.')


def parse_known_flags(argv: Sequence[str]) -> List[str]:
  """`flags_parser` for `absl.app.run` that leaves the flags it does not know
  (the multi-host ones, see `start_multihost`) in the returned argv."""
  try:
    return flags.FLAGS(argv, known_only=True)
  except flags.Error as e:
    raise absl_flags_error(e) from None


def start_multihost(argv: Sequence[str]) -> List[str]:
  """Reads the multi-host flags left in `argv` and starts jax.distributed if
  they ask for it; `argv` less those flags. Loads JAX."""
  from mixer_jax.training import sharding  # pylint: disable=g-import-not-at-top
  sharding.define_multihost_flags()
  try:
    argv = flags.FLAGS(argv)
  except flags.Error as e:
    raise absl_flags_error(e) from None
  sharding.initialize_from_flags()
  return argv
