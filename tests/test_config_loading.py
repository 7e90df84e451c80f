"""Tests for mixer_jax.training.config_loading: config files and flags, clear errors."""

import os
import subprocess
import sys
import textwrap

import pytest

from mixer_jax.training import config_loading
from mixer_jax.training import config_validation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ConfigError = config_validation.ConfigError
QUICKSTART = os.path.join(REPO, 'configs', 'quickstart.py')


def write(tmp_path, text, name='cfg.py'):
  path = tmp_path / name
  path.write_text(textwrap.dedent(text))
  return str(path)


@pytest.mark.parametrize('text,expected', [
    ('def get_config(:\n  pass\n', r'cfg.py, line 1: cannot be loaded: '
     'SyntaxError'),
    ('import os\n\ndef get_config():\n  raise RuntimeError("boom")\n',
     r'cfg.py, line 4: get_config\(\) raised RuntimeError: boom'),
    ('def get_config():\n  return 42\n',
     r'cfg.py: get_config\(\) returned 42 \(int\), not an'),
    ('X = 1\n', r'cfg.py defines no get_config'),
    ('import no_such_module_here\n', r'cfg.py, line 1: cannot be loaded: '
     'ModuleNotFoundError'),
])
def test_a_config_file_that_fails_to_load_names_file_and_line(
    tmp_path, text, expected):
  path = write(tmp_path, text)
  with pytest.raises(ConfigError, match=expected):
    config_loading.check_command_line(['prog', f'--config={path}'])


def test_missing_config_file(tmp_path):
  with pytest.raises(ConfigError, match='missing.py does not exist'):
    config_loading.check_command_line(['prog', '--config',
                                       str(tmp_path / 'missing.py')])


def test_a_field_the_defaults_do_not_define_is_refused_where_it_is_set(
    tmp_path):
  # The config file builds on the package's locked defaults, so the typo
  # fails on its own line (line 4 below) and nothing is trained.
  path = write(tmp_path, '''
      from mixer_jax import config_defaults
      def get_config():
        c = config_defaults.get_config()
        c.learning_rat = 5.0
        return c
  ''')
  with pytest.raises(ConfigError) as error:
    config_loading.check_command_line(['prog', f'--config={path}'])
  assert str(error.value) == (
      f'Config file {path}, line 5: get_config() raised unknown config '
      'field learning_rat; Did you mean "learning_rate" instead of '
      '"learning_rat"?')
  nested = write(tmp_path, '''
      from mixer_jax import config_defaults
      def get_config():
        c = config_defaults.get_config()
        c.evals.test = config_defaults.eval_entry(split='test')
        c.evals.test.splt = 'x'
        return c
  ''', name='nested.py')
  with pytest.raises(ConfigError, match=r'nested.py, line 6: .*unknown '
                     'config field splt; Did you mean "split"'):
    config_loading.check_command_line(['prog', f'--config={nested}'])


def test_unknown_override_flags_are_named_with_the_closest_field():
  with pytest.raises(ConfigError) as error:
    config_loading.check_command_line([
        'prog', f'--config={QUICKSTART}', '--config.learning_rate=0.1',
        '--config.bach_size=8', '--config.pp.mixup_alpa=0.1'])
  assert str(error.value).splitlines() == [
      'Unknown config field bach_size (flag --config.bach_size); did you '
      'mean batch_size?',
      'Unknown config field pp.mixup_alpa (flag --config.pp.mixup_alpa); '
      'did you mean pp.mixup_alpha?']
  # Valid files and flags pass; so do the paper's configs and evals entries.
  for name in sorted(os.listdir(os.path.join(REPO, 'configs'))):
    if name.endswith('.py') and name != '__init__.py':
      config_loading.check_command_line([
          'prog', f'--config={os.path.join(REPO, "configs", name)}',
          '--config.model.hidden_dim=8'])


@pytest.mark.slow
def test_command_line_config_errors_have_no_traceback(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  bad = write(tmp_path, 'def get_config():\n  return 42\n')
  for args, expected in [
      ([f'--config={QUICKSTART}', '--config.learning_rat=1'],
       'did you mean learning_rate?'),
      ([f'--config={bad}'], 'returned 42'),
      ([f'--config={QUICKSTART}', '--workdir='], 'workdir=\'\''),
  ]:
    if not any(a.startswith('--workdir') for a in args):
      args.append(f'--workdir={tmp_path / "run"}')
    run = subprocess.run([sys.executable, '-m', 'mixer_jax.train'] + args,
                         cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 1, run.stderr[-2000:]
    assert expected in run.stderr and 'ConfigError' in run.stderr
    assert 'Traceback' not in run.stderr, run.stderr[-3000:]
  assert not (tmp_path / 'run').exists()


def test_config_argument_reaches_get_config(tmp_path):
  # big_vision / ml_collections form: the text after ':' is get_config's arg.
  spec = os.path.join(REPO, 'configs', 'mixer_i1k.py') + ':L_16'
  config = config_loading.load_config_file(spec)
  assert config.model.variant == 'L_16'
  config_loading.check_command_line(['prog', f'--config={spec}',
                                     '--config.batch_size=8'])
  with pytest.raises(ConfigError) as error:
    config_loading.check_command_line(['prog', f'--config={QUICKSTART}:L_16'])
  assert str(error.value) == (
      f'Config file {QUICKSTART}: get_config() takes no argument, but '
      f"--config={QUICKSTART}:L_16 passes 'L_16'; drop \":L_16\".")
  with pytest.raises(ConfigError, match='nope.py does not exist'):
    config_loading.load_config_file(str(tmp_path / 'nope.py') + ':B_16')


def test_the_programs_run_a_config_file_once(tmp_path):
  # The file notes each execution; the program's parser (as train and
  # evaluate use it) must run it once and still apply the overrides.
  runs = tmp_path / 'runs.txt'
  path = write(tmp_path, f'''
      from mixer_jax import config_defaults
      with open({str(runs)!r}, 'a') as f:
        f.write('module\\n')
      def get_config():
        with open({str(runs)!r}, 'a') as f:
          f.write('get_config\\n')
        return config_defaults.get_config()
  ''')
  program = textwrap.dedent('''
      import sys
      from absl import flags
      from ml_collections import config_flags
      from mixer_jax.training import config_loading
      config_flags.DEFINE_config_file('config', None, 'cfg', lock_config=True)
      flags.DEFINE_string('workdir', None, 'w')
      rest = config_loading.parse_flags(sys.argv)
      c = flags.FLAGS.config
      print(rest[1:], c.batch_size, c.model.variant, c.is_locked,
            flags.FLAGS.workdir)
  ''')
  run = subprocess.run(
      [sys.executable, '-c', program, '--config', path,
       '--config.batch_size=8', '--workdir=w', '--config.model.variant=S_16'],
      env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu'),
      capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert run.stdout.split() == ['[]', '8', 'S_16', 'True', 'w']
  assert runs.read_text().split() == ['module', 'get_config']
