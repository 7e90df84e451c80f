"""Reads `--config` (ml_collections' `DEFINE_config_file`) for train and
evaluate: one line naming file and line instead of a traceback, and
`validate_config`, before JAX or TensorFlow is imported."""

import os
import sysconfig
import traceback
from typing import Callable, List, Optional, Sequence

from absl import flags
import ml_collections
from ml_collections import config_flags

from mixer_jax.errors import UserError
from mixer_jax.training import command_line
from mixer_jax.training.config_validation import ConfigError
from mixer_jax.training.config_validation import validate_config

_STDLIB = sysconfig.get_paths()['stdlib']


def _where(error: BaseException) -> str:
  """'FILE, line N: ' of the innermost frame outside the libraries."""
  if isinstance(error, SyntaxError):
    return f'{error.filename}, line {error.lineno}: '
  frames = [f for f in traceback.extract_tb(error.__traceback__)
            if not f.filename.startswith((_STDLIB, '<')) and f.filename !=
            __file__ and not {'site-packages', 'dist-packages'} & set(
                f.filename.split(os.sep))]
  return f'{frames[-1].filename}, line {frames[-1].lineno}: ' if frames else ''


def one_line(error: BaseException) -> str:
  """`error` of a config file or override, in one line.

  ml_collections' messages for an unknown field list every field of the
  config; the first line names the field and the last the closest one.
  """
  where = _where(error)
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]  # AttributeError(KeyError(...)) of an override.
  if isinstance(error, SyntaxError):
    return f'{where}SyntaxError: {error.msg}'
  text = str(error.args[0]) if error.args else str(error)
  lines = [line.strip() for line in text.splitlines() if line.strip()] or ['']
  head = lines[0].split('. Other fields present')[0].rstrip(':')
  if isinstance(error, KeyError) and not head.startswith('Key '):
    head = f'unknown config field {head}'
  if len(lines) > 1 and lines[-1].startswith('Did you mean'):
    head += f'; {lines[-1]}'
  elif isinstance(error, OSError):
    head = lines[-1]  # The failed attempt: "No such file or directory".
  elif len(lines) > 1 and 'Other fields present' not in lines[0]:
    head += f': {lines[-1]}'  # ml_collections' traceback text: its end.
  name = ('' if isinstance(error, (flags.Error, KeyError))
          else f'{type(error).__name__}: ')
  return f'{where}{name}{head}'


def parse_flags(argv: Sequence[str], help_text: str = 'Config file.',
                config_when_missing: Optional[Callable] = None) -> List[str]:
  """`flags_parser` for `absl.app.run`: defines and reads `--config`, one
  line (exit 1) for what it refuses. Without `--config`,
  `config_when_missing()` may return the ConfigDict the overrides apply to.
  """
  # ml_collections wants --config before its overrides; users need not.
  at = [i for i, arg in enumerate(argv) if arg.split('=')[0] == '--config']
  if at:
    end = at[0] + (1 if '=' in argv[at[0]] else 2)
    argv = [argv[0], *argv[at[0]:end], *argv[1:at[0]], *argv[end:]]
  try:
    saved = None
    if not at and config_when_missing is not None:
      flags.FLAGS(argv, known_only=True)  # The flags it reads.
      saved = config_when_missing()
    if saved is None:
      config_flags.DEFINE_config_file('config', None, help_text,
                                      lock_config=True, sys_argv=argv)
      flags.mark_flag_as_required('config')
    else:
      config_flags.DEFINE_config_dict('config', saved, help_text,
                                      lock_config=True, sys_argv=argv)
    rest = flags.FLAGS(argv, known_only=True)  # See start_multihost.
    config = flags.FLAGS.config
    if not isinstance(config, ml_collections.ConfigDict):
      hasattr(config, 'lock')  # A file that failed to load raises here.
      raise ConfigError(f'{flags.FLAGS["config"].serialize()}: get_config() '
                        f'returned {config!r}, not an ml_collections '
                        'ConfigDict (start from mixer_jax.config_defaults'
                        '.get_config()).')
    validate_config(config)
  except UserError as e:  # An invalid config, or config_when_missing's.
    raise SystemExit(f'{type(e).__name__}: {e}') from None
  except flags.Error as e:
    if 'config' not in str(e).split(':')[0]:
      raise command_line.absl_flags_error(e) from None
    text = one_line(e)
    if 'get_config() takes 0 positional' in text:  # FILE:ARG, ARG unused.
      spec = argv[1].split('=', 1)[1] if '=' in argv[1] else argv[2]
      text += ("; this config file takes no argument: drop "
               f"':{spec.split(':')[-1]}'.")
    raise SystemExit(f'ConfigError: {text}') from None
  except Exception as e:  # pylint: disable=broad-except
    raise SystemExit(f'ConfigError: {one_line(e)}') from None
  return rest
