"""The README's and docs/' commands, as a user copies them, in their order.

A command is a line of a fenced code block in README.md or docs/*.md that
starts with `.venv/bin/python -m mixer_jax.` or `.venv/bin/python -c` (the
interpreter the set-up commands install); the README's first set-up command
ends with the quick start, which comes first. Other lines (pytest,
tools/compare_timm.py) are not run here.
The form `-m mixer_jax.` appears nowhere else in those files, so no command
escapes these tests. The configs' docstrings' commands are checked too.

- Fast: the two set-up commands are single lines and the test one is what
  `.ci/run` runs; every `--flag` of every command is one its program
  defines, and `--config` files load with their overrides.
- Slow: in a fresh folder (the repository's `configs/` linked in), every
  command runs in the documented order, README first, then docs/ by name;
  before each, the files and folders it reads exist and a `--step=K` is a
  kept step. Commands that need the network are in NOT_RUN; training
  configs other than the quick start (ImageNet, CIFAR with downloaded
  weights) and the benchmarks run with tiny sizes, training in launch-check
  mode (`--check_only`). Then the README's Python example runs there, with
  files of the published B/16 shapes in the registry's cache.
"""

import ast
import glob
import os
import re
import runpy
import shlex
import subprocess
import sys

from absl import flags
import jax
from ml_collections import config_flags
import numpy as np
import pytest

import mixer_reference as ref

from mixer_jax.training import launch_check
from mixer_jax.training import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAMS = ('train', 'evaluate', 'predict', 'export', 'fewshot', 'benchmark',
            'visualize')
PYTHON = '.venv/bin/python'
SETUP = 'python3 -m venv .venv && .venv/bin/pip install -q -e '

# Commands holding one of these are only checked (flags, config), not run.
NOT_RUN = {
    'gs://': 'writes to Google Cloud Storage',
    'hf-hub:': 'downloads from the Hugging Face Hub',
    '--checkpoint=imagenet1k/': 'downloads a published checkpoint',
    '--push_to=': 'uploads to the Hugging Face Hub',
}

# Appended to commands that would otherwise need hours or data sets that
# are not here: the same program and code paths at tiny sizes.
TINY_MODEL = ('--config.model.num_blocks=1', '--config.model.hidden_dim=16',
              '--config.model.tokens_mlp_dim=8',
              '--config.model.channels_mlp_dim=16', '--config.init_from=',
              '--check_only', '--devices=8')
TINY = {
    'benchmark': ('--num_blocks=1', '--hidden_dim=16', '--tokens_mlp_dim=8',
                  '--channels_mlp_dim=16', '--image_size=32', '--repeats=1',
                  '--peak_size=64', '--loop_steps=20', '--num_images=16',
                  '--width=64', '--height=48', '--num_batches=2',
                  '--warmup_batches=1'),
}


def _read(name):
  with open(os.path.join(REPO, name), encoding='utf-8') as f:
    return f.read()


def documents():
  """README.md, then docs/*.md by name: the order a user reads them."""
  docs = sorted(glob.glob(os.path.join(REPO, 'docs', '*.md')))
  return ['README.md'] + [os.path.relpath(d, REPO) for d in docs]


def _fenced_lines(text):
  """(line number, line) of the lines inside ``` blocks, `\\` joined."""
  inside, joined, start = False, '', 0
  for number, line in enumerate(text.splitlines(), 1):
    if line.startswith('```'):
      inside = not inside
      continue
    if not inside:
      continue
    if not joined:
      start = number
    if line.endswith('\\'):
      joined += line[:-1] + ' '
      continue
    yield start, joined + line
    joined = ''


def setup_commands():
  return [line for _, line in _fenced_lines(_read('README.md'))
          if line.startswith('python3 -m venv')]


def quickstart_last_lines():
  """The lines the README shows the quick start ending with (the first
  fenced block after the set-up commands), '...' left out."""
  text = _read('README.md')
  block = text[text.index('its last lines are'):].split('```')[1]
  return [line for line in block.strip().splitlines()
          if line.strip() != '...']


def quickstart_command():
  (line,) = [c for c in setup_commands() if 'mixer_jax.train' in c]
  return line.split(' && ')[-1]


def journey():
  """[(where, argv)] of the documents' commands, in order; argv[0] is
  `.venv/bin/python`."""
  found = [('README.md set-up', shlex.split(quickstart_command()))]
  for name in documents():
    for number, line in _fenced_lines(_read(name)):
      if line.startswith((PYTHON + ' -m mixer_jax.', PYTHON + ' -c ')):
        found.append((f'{name}:{number}', shlex.split(line)))
  return found


def _program(argv):
  if argv[1:2] == ['-m'] and argv[2].startswith('mixer_jax.'):
    return argv[2][len('mixer_jax.'):]
  return None


def documented_commands():
  """[(where, program, flags and arguments)] of every documented command."""
  found = [(where, _program(argv), argv[3:]) for where, argv in journey()
           if _program(argv)]
  for name in sorted(os.listdir(os.path.join(REPO, 'configs'))):
    if not name.endswith('.py'):
      continue
    text = ast.get_docstring(ast.parse(_read(f'configs/{name}'))) or ''
    for line in text.replace('\\\n', ' ').splitlines():
      match = re.search(r'python3? -m mixer_jax\.(\w+)((?: +[^ `#]+)*)', line)
      if match:
        found.append((f'configs/{name}', match.group(1),
                      shlex.split(match.group(2))))
  return found


def test_setup_commands_are_single_lines_and_ci_runs_the_test_one():
  commands = setup_commands()
  assert len(commands) == 2, commands
  train, tests = sorted(commands, key=lambda c: 'pytest' in c)
  assert train.startswith(SETUP + "'.[tf]' && ")
  assert train.endswith(' -m mixer_jax.train --config=configs/quickstart.py '
                        '--workdir=workdirs/quickstart')
  assert tests.startswith(SETUP + "'.[test]' && ")
  ci = [line for line in _read('.ci/run').splitlines()
        if line and not line.startswith(('#', 'set ', 'cd '))]
  assert ci == [tests]


def test_every_command_is_in_a_fenced_block_and_starts_with_the_venv():
  for name in documents():
    text = _read(name)
    fenced = '\n'.join(line for _, line in _fenced_lines(text))
    assert text.count('-m mixer_jax.') == fenced.count('-m mixer_jax.'), (
        f'{name}: a command outside a ``` block is not tested; move it into '
        'one')
    for _, line in _fenced_lines(text):
      if '-m mixer_jax.' in line and not line.startswith('python3 -m venv'):
        assert line.startswith(PYTHON + ' -m mixer_jax.'), line


def test_the_documents_cover_each_program_and_not_run_is_current():
  commands = journey()
  programs = {_program(argv) for _, argv in commands}
  assert set(PROGRAMS) <= programs, set(PROGRAMS) - programs
  for marker in NOT_RUN:
    assert any(marker in ' '.join(argv) for _, argv in commands), (
        f'NOT_RUN lists {marker!r}, which no documented command holds')


def _defined_flags(program):
  source = _read(f'mixer_jax/{program}.py')
  names = set(re.findall(r"DEFINE_\w+\(\s*'(\w+)'", source))
  if 'config_loading.parse_flags' in source:
    names.add('config')
  if 'start_multihost' in source:
    names |= {'multihost', 'coordinator_address', 'num_processes',
              'process_id'}
  if 'define_checkpoint_flags' in source:
    names |= {'checkpoint', 'step', 'weights'}
  if 'define_verbose_flag' in source:
    names.add('verbose')
  if 'SIZE_FLAGS' in source:
    names |= set(re.search(r'SIZE_FLAGS = \(([^)]*)\)', source).group(1)
                 .replace("'", '').replace(' ', '').replace('\n', '')
                 .split(','))
  return names | {'help', 'helpshort', 'helpfull'}


@pytest.mark.parametrize('where,program,argv', documented_commands(),
                         ids=lambda x: x if isinstance(x, str) else None)
def test_documented_command_parses_and_resolves(where, program, argv):
  assert program in PROGRAMS, f'{where}: no program mixer_jax.{program}'
  defined = _defined_flags(program)
  flags_given = [a for a in argv if a.startswith('--')]
  for arg in flags_given:
    name = arg[2:].split('=', 1)[0]
    name = name[2:] if name.startswith('no') and name[2:] in defined else name
    assert name.split('.')[0] in defined, f'{where}: {program} has no {arg}'
  config_args = [a.replace('--config=configs/', f'--config={REPO}/configs/')
                 for a in flags_given if a.startswith('--config')]
  if not any(a.startswith('--config=') for a in config_args):
    return
  # Parsed as the programs parse it: ml_collections' DEFINE_config_file.
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, flag_values=values,
                                  lock_config=True,
                                  sys_argv=['prog'] + config_args)
  values(['prog'] + config_args)
  config = values.config
  launch_check.config_validation.validate_config(config)
  if program != 'train':
    return
  config.init_from = ''  # Not downloaded in the suite.
  launch_check.config_validation.validate_config(
      config, num_devices=jax.device_count(), num_processes=1)
  launch_check._dataset_facts(config)  # pylint: disable=protected-access
  assert trainer.create_mesh(config).devices.size == jax.device_count()


def _value(argv, name):
  values = [a.split('=', 1)[1] for a in argv if a.startswith(f'--{name}=')]
  return values[-1] if values else None


def _with(argv, extra):
  """argv with the flags of `extra` replacing any it already sets."""
  names = {e.split('=', 1)[0] for e in extra}
  return [a for a in argv if a.split('=', 1)[0] not in names] + list(extra)


def _runnable(argv):
  """The argv to run: tiny sizes where the documented one needs hours or
  data sets that are not here."""
  program = _program(argv)
  if program == 'train' and _value(argv, 'config') != 'configs/quickstart.py':
    path, *arg = os.path.join(REPO, _value(argv, 'config')).split(':', 1)
    config = runpy.run_path(path)['get_config'](*arg)
    patch = int((_value(argv, 'config.model.variant') or
                 config.model.variant).split('_')[1])
    return _with(argv, TINY_MODEL + (
        f'--config.image_size={2 * patch}',
        f'--config.batch_size={16 * config.grad_accum_steps}'))
  return _with(argv, TINY.get(program, ()))


def _inputs(argv):
  """The files and folders a command reads (not those it writes)."""
  program = _program(argv)
  paths = []
  checkpoint = _value(argv, 'checkpoint')
  if checkpoint:
    paths.append(checkpoint)
    if _value(argv, 'step'):
      paths.append(os.path.join(checkpoint, 'checkpoints',
                                _value(argv, 'step')))
  if _value(argv, 'config'):
    paths.append(_value(argv, 'config').split(':')[0])
  if program == 'predict':
    paths += [a for a in argv[3:] if not a.startswith('-')]
  return paths


def model_api_failure(folder, env):
  """Runs the README's Python example in `folder` (where the quick start
  ran) with files of the published B/16 shapes in the registry's cache;
  what went wrong, or None."""
  for name, classes in (('imagenet1k/Mixer-B_16', 1000),
                        ('imagenet21k/Mixer-B_16', 21843)):
    path = os.path.join(env['MIXER_JAX_CACHE'], f'{name}.npz')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path, **ref.official_checkpoint(
        patch=16, blocks=12, hidden=768, tokens_mlp=384, channels_mlp=3072,
        image=224, classes=classes))
  (example,) = re.findall(r'```python\n(.*?)```', _read('README.md'), re.S)
  proc = subprocess.run([sys.executable, '-c', example], cwd=folder, env=env,
                        capture_output=True, text=True, timeout=600)
  if proc.returncode != 0 or proc.stdout.split() != ['59880472']:
    # The paper's B/16 count is what the example's comment shows.
    return (f'README.md Model API: exit {proc.returncode}: '
            f'{(proc.stdout + proc.stderr)[-1500:]}')
  return None


@pytest.mark.slow
def test_documented_commands_run_in_order(tmp_path):
  os.symlink(os.path.join(REPO, 'configs'), tmp_path / 'configs')
  env = dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE='1',
             TFDS_DATA_DIR=str(tmp_path / 'tensorflow_datasets'),
             MIXER_JAX_CACHE=str(tmp_path / 'cache'))
  env.pop('XLA_FLAGS', None)  # One device, as on a user's machine.
  failures = []
  for where, argv in journey():
    text = ' '.join(argv)
    if any(marker in text for marker in NOT_RUN):
      continue
    missing = [p for p in _inputs(argv)
               if not glob.glob(os.path.join(tmp_path, p))]
    if missing:
      failures.append(f'{where}: {text}\n  needs {missing}, which the '
                      'commands before it did not make')
      continue
    run = [sys.executable] + _runnable(argv)[1:]
    proc = subprocess.run(run, cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:
      failures.append(f'{where}: {text}\n  exit {proc.returncode}: '
                      f'{(proc.stdout + proc.stderr)[-1500:]}')
      continue
    if '--check_only' in run and os.path.exists(
        tmp_path / _value(argv, 'workdir')):
      failures.append(f'{where}: the launch check wrote its workdir')
    out = _value(argv, 'out')  # A folder (export), file or prefix (visualize).
    if out:
      path = str(tmp_path / out)
      if not (os.listdir(path) if os.path.isdir(path) else glob.glob(
          path + '*')):
        failures.append(f'{where}: nothing written at {out}')
    if where == 'README.md set-up':
      # The README names the steps the quick start keeps.
      assert sorted(os.listdir(
          tmp_path / 'workdirs/quickstart/checkpoints')) == ['1000', '1500']
      # What the README says it prints (spacing aside), in that order.
      printed = [line.split() for line in proc.stdout.splitlines()]
      shown = [line.split() for line in quickstart_last_lines()]
      assert shown[0] in printed, (shown[0], proc.stdout[-1500:])
      at = printed.index(shown[0])
      assert all(line in printed[at:] for line in shown), (
          quickstart_last_lines(), proc.stdout[-1500:])
      # The summary lists every eval the run printed, paths as given.
      workdir = _value(argv, 'workdir')
      for key, value in (('test/accuracy', None), ('workdir', workdir),
                         ('checkpoint_dir', f'{workdir}/checkpoints'),
                         ('metrics_file', f'{workdir}/metrics.jsonl')):
        assert any(line[:1] == [key] and value in (None, line[-1])
                   for line in printed[at:]), (key, proc.stdout[-1500:])
    elif argv == shlex.split(quickstart_command()):
      if 'finished' not in proc.stdout.lower():
        failures.append(f'{where}: a finished workdir does not say so:\n'
                        f'{proc.stdout[-1500:]}')
  failures.append(model_api_failure(tmp_path, env))
  assert failures == [None], '\n'.join(map(str, failures))
