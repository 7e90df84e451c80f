"""mixer_jax.training.config_loading: config files and flags, one-line errors.

Each case runs a program's flag parser in a fresh interpreter, as
`python -m mixer_jax.train` does, so absl's flags start empty.
"""

import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, 'configs', 'quickstart.py')
# A program that parses its flags as train does, then prints the config and
# which heavy libraries were imported.
PROGRAM = textwrap.dedent('''
    import sys
    from absl import flags
    from mixer_jax.training import config_loading
    flags.DEFINE_string('workdir', None, 'w')
    rest = config_loading.parse_flags(sys.argv)
    c = flags.FLAGS.config
    print(rest[1:], c.batch_size, c.model.variant, c.is_locked,
          flags.FLAGS.workdir,
          sorted(m for m in ('jax', 'tensorflow', 'flax', 'optax')
                 if m in sys.modules))
''')


def parse(*args, cwd=REPO):
  return subprocess.run(
      [sys.executable, '-c', PROGRAM, *args], cwd=cwd,
      env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
      timeout=120)


def write(tmp_path, text, name='cfg.py'):
  path = tmp_path / name
  path.write_text(textwrap.dedent(text))
  return str(path)


def assert_refused(run, expected):
  assert run.returncode == 1, run.stdout + run.stderr[-2000:]
  assert run.stderr.startswith('ConfigError: '), run.stderr[-2000:]
  assert run.stderr.count('\n') == 1, run.stderr  # One line, no traceback.
  assert expected in run.stderr, run.stderr


@pytest.mark.parametrize('text,expected', [
    ('def get_config(:\n  pass\n', 'cfg.py, line 1: SyntaxError'),
    ('import os\n\ndef get_config():\n  raise RuntimeError("boom")\n',
     'cfg.py, line 4: RuntimeError: boom'),
    ('def get_config():\n  return 42\n',
     'get_config() returned 42, not an ml_collections ConfigDict'),
    ('X = 1\n', "has no attribute 'get_config'"),
    ('import no_such_module_here\n', 'cfg.py, line 1: ModuleNotFoundError'),
])
def test_a_config_file_that_fails_to_load_is_one_line(tmp_path, text,
                                                      expected):
  assert_refused(parse(f'--config={write(tmp_path, text)}'), expected)


def test_missing_config_file(tmp_path):
  assert_refused(parse('--config', str(tmp_path / 'missing.py')),
                 'No such file or directory')


def test_a_field_the_defaults_do_not_define_is_refused_where_it_is_set(
    tmp_path):
  # The config file builds on the package's locked defaults, so the typo
  # fails on its own line (line 5 below) and nothing is trained.
  path = write(tmp_path, '''
      from mixer_jax import config_defaults
      def get_config():
        c = config_defaults.get_config()
        c.learning_rat = 5.0
        return c
  ''')
  assert_refused(parse(f'--config={path}'), (
      f'{path}, line 5: Key "learning_rat" does not exist and cannot be '
      'added since the config is locked; Did you mean "learning_rate" '
      'instead of "learning_rat"?'))
  nested = write(tmp_path, '''
      from mixer_jax import config_defaults
      def get_config():
        c = config_defaults.get_config()
        c.evals.test = config_defaults.eval_entry(split='test')
        c.evals.test.splt = 'x'
        return c
  ''', name='nested.py')
  assert_refused(parse(f'--config={nested}'),
                 'nested.py, line 6: Key "splt" does not exist')


@pytest.mark.parametrize('flag,expected', [
    ('--config.bach_size=8', 'unknown config field \'bach_size\'; Did you '
     'mean "batch_size"'),
    ('--config.pp.mixup_alpa=0.1', 'Did you mean "mixup_alpha"'),
    ('--config.batch_size=abc', 'flag --config.batch_size=abc: invalid '
     'literal for int()'),
    ('--config.optimizer=adamw', "config.optimizer='adamw': must be one of "
     'adam, sgd'),
])
def test_bad_override_flags_are_named(flag, expected):
  run = parse(f'--config={QUICKSTART}', '--config.learning_rate=0.1', flag)
  assert run.returncode == 1 and expected in run.stderr, run.stderr[-2000:]
  assert 'Traceback' not in run.stderr


def test_config_argument_reaches_get_config():
  # big_vision / ml_collections form: the text after ':' is get_config's arg.
  spec = os.path.join(REPO, 'configs', 'mixer_i1k.py') + ':L_16'
  run = parse(f'--config={spec}', '--config.batch_size=8')
  assert run.returncode == 0, run.stderr[-2000:]
  assert run.stdout.split()[1:3] == ['8', 'L_16']
  assert_refused(parse(f'--config={QUICKSTART}:L_16'),
                 'get_config() takes 0 positional arguments but 1 was given; '
                 "this config file takes no argument: drop ':L_16'.")
  assert_refused(parse('--config', f'{QUICKSTART}:L_16'), "drop ':L_16'.")


def test_the_config_is_read_once_checked_and_nothing_heavy_is_imported(
    tmp_path):
  # The file notes each execution: it runs once, the overrides apply (also
  # one given before --config), the config stays locked, and neither JAX nor
  # TensorFlow has been imported.
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
  run = parse('--config.batch_size=8', '--config', path, '--workdir=w',
              '--config.model.variant=S_16', '--multihost')
  assert run.returncode == 0, run.stderr[-3000:]
  assert run.stdout.split() == ["['--multihost']", '8', 'S_16', 'True', 'w',
                                '[]']
  assert runs.read_text().split() == ['module', 'get_config']


def test_validation_imports_neither_jax_nor_tensorflow():
  program = textwrap.dedent(f'''
      import runpy, sys
      from mixer_jax.training import config_validation
      config = runpy.run_path({QUICKSTART!r})['get_config']()
      config_validation.validate_config(config)
      print(sorted(m for m in ('jax', 'tensorflow') if m in sys.modules))
  ''')
  run = subprocess.run([sys.executable, '-c', program], cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=REPO),
                       capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr[-2000:]
  assert run.stdout.split() == ['[]']


@pytest.mark.slow
def test_command_line_config_errors_have_no_traceback(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  bad = write(tmp_path, 'def get_config():\n  return 42\n')
  for args, expected in [
      ([f'--config={QUICKSTART}', '--config.learning_rat=1'],
       'Did you mean "learning_rate"'),
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
