"""Every command the README and the configs' docstrings print still works.

Each `python -m mixer_jax.PROGRAM ...` command is cut out of the text
(with its `\\` continuations) and checked against the program as it is:
every `--flag` must be one the program defines (or a `--config.FIELD`
override of a field of that config), and every `--config=file.py[:ARG]`
is loaded by the programs' own loader with its overrides. Training
commands are then resolved as a run (and the launch check) would resolve
them: validation, class count, mesh and the sharded abstract state on 8
devices. The launch check compiling a documented command whole is
tests/test_launch_check.py's command test.
"""

import ast
import os
import re
import shlex

from absl import flags
import jax
from ml_collections import config_flags
import pytest

from mixer_jax.training import config_loading
from mixer_jax.training import launch_check
from mixer_jax.training import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAMS = ('train', 'evaluate', 'predict', 'export', 'fewshot', 'benchmark',
            'benchmark_input')


def _texts():
  yield 'README.md', open(os.path.join(REPO, 'README.md')).read()
  for name in sorted(os.listdir(os.path.join(REPO, 'configs'))):
    if name.endswith('.py'):
      with open(os.path.join(REPO, 'configs', name)) as f:
        yield f'configs/{name}', ast.get_docstring(ast.parse(f.read())) or ''


def documented_commands():
  """[(where, program, argv)] of every documented command."""
  found = []
  for where, text in _texts():
    text = text.replace('\\\\\n', ' ').replace('\\\n', ' ')
    for line in text.splitlines():
      match = re.search(r'python3? -m mixer_jax\.(\w+)((?: +[^ `#]+)*)', line)
      if not match or match.group(1) not in PROGRAMS:
        continue
      args = shlex.split(match.group(2))
      # [--flag=...] marks an optional flag: it is checked like the others.
      found.append((where, match.group(1),
                    [a.strip('[]') for a in args if a.strip('[]')]))
  return found


def _defined_flags(program):
  with open(os.path.join(REPO, 'mixer_jax', f'{program}.py')) as f:
    source = f.read()
  names = set(re.findall(r"DEFINE_\w+\(\s*'(\w+)'", source))
  if 'define_multihost_flags' in source:
    names |= {'multihost', 'coordinator_address', 'num_processes',
              'process_id'}
  if 'SIZE_FLAGS' in source:
    names |= set(re.search(r'SIZE_FLAGS = \(([^)]*)\)', source).group(1)
                 .replace("'", '').replace(' ', '').replace('\n', '')
                 .split(','))
  return names | {'help', 'helpshort', 'helpfull'}


def test_the_texts_document_commands_of_each_program():
  programs = {program for _, program, _ in documented_commands()}
  assert {'train', 'evaluate', 'predict', 'export', 'benchmark'} <= programs


@pytest.mark.parametrize('where,program,argv', documented_commands(),
                         ids=lambda x: x if isinstance(x, str) else None)
def test_documented_command_parses_and_resolves(where, program, argv):
  defined = _defined_flags(program)
  flags_given = [a for a in argv if a.startswith('--')]
  for arg in flags_given:
    name = arg[2:].split('=', 1)[0]
    name = name[2:] if name.startswith('no') and name[2:] in defined else name
    assert name.split('.')[0] in defined, f'{where}: {program} has no {arg}'
  config_args = [a for a in flags_given if a.startswith('--config')]
  if not any(a.startswith('--config=') for a in config_args):
    return
  # The programs' own loader: file, ARG, override names.
  config_loading.check_command_line(['prog'] + [
      a.replace('--config=configs/', f'--config={REPO}/configs/')
      for a in config_args])
  if program != 'train':
    return
  # Parsed as train parses it: ml_collections' DEFINE_config_file.
  argv = ['prog'] + [a.replace('--config=configs/',
                               f'--config={REPO}/configs/')
                     for a in config_args]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, flag_values=values,
                                  lock_config=False, sys_argv=argv)
  values(argv)
  config = values.config
  config.init_from = ''  # Not downloaded in the suite.
  launch_check.config_validation.validate_config(
      config, num_devices=jax.device_count(), num_processes=1)
  launch_check._dataset_facts(config)  # pylint: disable=protected-access
  assert trainer.create_mesh(config).devices.size == jax.device_count()
