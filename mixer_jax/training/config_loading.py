"""Loads `--config` files for the programs, with one-line errors.

`parse_flags` is the `flags_parser` that train and evaluate give to
`absl.app.run`. Before absl parses the flags, it loads the file named by
`--config` itself and checks it:

- a file that is missing, has a syntax error, raises, has no `get_config`,
  or whose `get_config()` does not return a ConfigDict is reported with the
  file and line, in one message and without a traceback;
- a field the defaults do not define is refused where the file sets it:
  config files start from `mixer_jax.config_defaults.get_config()`, a
  locked ConfigDict (`c.learning_rat = 5.0` raises, so it cannot train with
  the default rate unnoticed);
- every `--config.FIELD=VALUE` flag must name a field of the config (named
  with the closest valid one, by difflib).

The file runs once: absl then gets the loaded ConfigDict (locked), not the
file, and applies the `--config.FIELD=VALUE` overrides to it.
"""

import difflib
import importlib.util
import inspect
import os
import traceback
from typing import Callable, List, Optional, Sequence

from absl import flags
import ml_collections
from ml_collections import config_flags

from mixer_jax.training.config_validation import ConfigError



def _where(error: BaseException, path: str) -> str:
  """'FILE, line N' of the deepest frame of `error` inside `path`."""
  if isinstance(error, SyntaxError) and error.filename:
    return f'{error.filename}, line {error.lineno}'
  line = None
  real = os.path.realpath(path)
  for frame in traceback.extract_tb(error.__traceback__):
    if os.path.realpath(frame.filename) == real:
      line = frame.lineno
  return f'{path}, line {line}' if line else path


def split_config_arg(spec: str):
  """('configs/mixer_i1k.py', ['L_16']) of 'configs/mixer_i1k.py:L_16'.

  The text after the first ':' is passed to get_config(), as
  ml_collections' `DEFINE_config_file` does (it splits the same way).
  """
  path, *arg = spec.split(':', 1)
  return path, arg


def _takes_an_argument(fn) -> bool:
  try:
    inspect.signature(fn).bind('arg')
    return True
  except TypeError:
    return False


def load_config_file(spec: str):
  """Runs get_config() of `spec` ('file.py' or 'file.py:ARG'); its ConfigDict.

  Raises:
    ConfigError: naming the file (and line) when it cannot be loaded.
  """
  path, arg = split_config_arg(spec)
  if not os.path.isfile(path):
    raise ConfigError(f'Config file {path} does not exist.')
  name = '_mixer_jax_config_' + os.path.splitext(os.path.basename(path))[0]
  try:
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f'Config file {_where(e, path)}: cannot be loaded: '
                      f'{_describe(e)}') from None
  if not callable(getattr(module, 'get_config', None)):
    raise ConfigError(f'Config file {path} defines no get_config() '
                      'function.')
  if arg and not _takes_an_argument(module.get_config):
    raise ConfigError(f'Config file {path}: get_config() takes no argument, '
                      f'but --config={spec} passes {arg[0]!r}; drop ":{arg[0]}".')
  try:
    config = module.get_config(*arg)
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f'Config file {_where(e, path)}: get_config() raised '
                      f'{_describe(e)}') from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(
        f'Config file {path}: get_config() returned {config!r} '
        f'({type(config).__name__}), not an ml_collections.ConfigDict (start '
        'from mixer_jax.config_defaults.get_config()).')
  return config


def _fields(config, prefix='') -> List[str]:
  out = []
  for key, value in config.items():
    out.append(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      out += _fields(value, f'{prefix}{key}.')
  return out


def _unknown_message(name: str, valid: Sequence[str], source: str) -> str:
  close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
  if not close:  # e.g. 'model.hiden' against leaf names only.
    leaf = name.rsplit('.', 1)[-1]
    leaves = {v.rsplit('.', 1)[-1]: v for v in valid}
    close = [leaves[m] for m in difflib.get_close_matches(leaf, leaves, n=1)]
  hint = f'; did you mean {close[0]}?' if close else '.'
  return f'Unknown config field {name} ({source}){hint}'


def _describe(error: BaseException) -> str:
  """`error` in one line; a field set on the locked defaults is named.

  ml_collections' own message for that case dumps every field of the
  ConfigDict; its first sentence names the field and its last line the
  closest existing one.
  """
  text = str(error).strip().strip("'\"")
  if isinstance(error, AttributeError) and 'config is locked' in text:
    field = text.split('"')[1] if text.count('"') >= 2 else '?'
    lines = text.replace('\\n', '\n').splitlines()
    hint = (f'; {lines[-1].strip()}' if lines[-1].startswith('Did you mean')
            else '')
    return f'unknown config field {field}{hint}'
  return f'{type(error).__name__}: {text.splitlines()[0] if text else ""}'


def config_flag_values(argv: Sequence[str], flag: str):
  """(config file or None, [(field, flag text)]) from the command line."""
  path, overrides = None, []
  args = list(argv[1:])
  for i, arg in enumerate(args):
    if arg == '--':
      break
    if arg.startswith(f'--{flag}='):
      path = arg.split('=', 1)[1]
    elif arg == f'--{flag}' and i + 1 < len(args):
      path = args[i + 1]
    elif arg.startswith(f'--{flag}.'):
      overrides.append((arg[len(flag) + 3:].split('=', 1)[0], arg))
  return path, overrides


def check_command_line(argv: Sequence[str], flag: str = 'config'):
  """Loads and checks `--config` and its `--config.FIELD` overrides.

  Returns:
    The config the file returned (overrides not applied), or None when no
    `--config` is given.

  Raises:
    ConfigError: one line per problem.
  """
  path, overrides = config_flag_values(argv, flag)
  if not path:
    return None  # absl reports the missing required flag.
  config = load_config_file(path)
  check_overrides(config, overrides)
  return config


def check_overrides(config, overrides):
  """Raises ConfigError naming each override that is not a field of config."""
  valid = _fields(config)
  problems = [_unknown_message(name, valid, f'flag {text.split("=")[0]}')
              for name, text in overrides if name not in valid]
  if problems:
    raise ConfigError('\n'.join(problems))


def _without_config_file(argv: Sequence[str], flag: str) -> List[str]:
  """`argv` less `--flag=FILE` / `--flag FILE` (its overrides stay)."""
  out, args = [argv[0]], list(argv[1:])
  i = 0
  while i < len(args):
    arg = args[i]
    if arg == '--':
      out += args[i:]
      break
    if arg.startswith(f'--{flag}='):
      i += 1
      continue
    if arg == f'--{flag}':
      i += 2
      continue
    out.append(arg)
    i += 1
  return out


def _give_absl_the_loaded_config(config, argv: Sequence[str],
                                 flag: str = 'config') -> List[str]:
  """Replaces the program's config-file flag by one holding `config`.

  `config_flags.DEFINE_config_dict` takes a ConfigDict instead of a file and
  applies the `--flag.FIELD=VALUE` overrides to it, so the file that
  `check_command_line` ran is not run a second time by ml_collections.

  Returns:
    The argv for absl (without the file argument).
  """
  help_text = flags.FLAGS[flag].help if flag in flags.FLAGS else ''
  if flag in flags.FLAGS:
    delattr(flags.FLAGS, flag)
  argv = _without_config_file(argv, flag)
  config_flags.DEFINE_config_dict(flag, config, help_text, lock_config=True,
                                  sys_argv=argv)
  return argv


def parse_flags(argv: Sequence[str],
                config_when_missing: Optional[Callable] = None) -> List[str]:
  """`flags_parser` for `absl.app.run`: config problems without tracebacks.

  Exits with status 1 and a short message on an invalid config file or
  config flag; other flag errors are absl's usual one-line message.

  Args:
    argv: the command line.
    config_when_missing: called with `argv` when no `--config` is given; the
      ConfigDict it returns (e.g. a workdir's saved config), if any, takes
      the `--config.FIELD=VALUE` overrides as a file's config would.
  """
  try:
    config = check_command_line(argv)
    if config is None and config_when_missing is not None:
      config = config_when_missing(argv)
      if config is not None:
        check_overrides(config, config_flag_values(argv, 'config')[1])
  except ConfigError as e:
    raise SystemExit(f'ConfigError: {e}') from None
  if config is not None:
    argv = _give_absl_the_loaded_config(config, argv)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    raise SystemExit(f'FATAL Flags parsing error: {e}\nPass --helpshort or '
                     '--helpfull to see help on flags.') from None
  except Exception as e:  # pylint: disable=broad-except
    # A value ml_collections cannot parse (e.g. a string for an int field).
    raise SystemExit(f'ConfigError: {type(e).__name__}: '
                     f'{str(e).strip().splitlines()[0]}') from None

