"""The package pip installs behaves as the checkout does.

A wheel is built from the checkout's files and installed into a fresh
virtual environment whose only other entry on the path is the shared
site-packages of the dependencies (added as a path, so its own .pth files,
among them an editable install of mixer_jax, are not run). That interpreter
runs outside the repository with no PYTHONPATH, so neither the checkout's
`mixer_jax/` nor its `configs/` can be imported: what it does is what a
user's `pip install` gets. It must refuse a misspelt config field and read a
workdir's saved config exactly as the checkout reads it (the defaults fill
the fields the run did not save).

Offline: pip builds the wheel from the local files without an index
(`--no-index --no-build-isolation`, setuptools from the environment).
"""

import json
import os
import site
import subprocess
import sys
import textwrap
import venv

import pytest

from mixer_jax import config_defaults
from mixer_jax.weights import run_info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run by the installed interpreter: where mixer_jax comes from, whether the
# repository's configs/ is importable, the error of a misspelt field, and
# the config read back from a workdir.
_PROBE = textwrap.dedent('''
    import importlib.util, json, sys
    import mixer_jax
    from mixer_jax.training import config_loading
    from mixer_jax.weights import run_info
    typo_file, workdir = sys.argv[1:3]
    try:
      config_loading.parse_flags(['train', '--config=' + typo_file])
      typo_error = None
    except SystemExit as e:
      typo_error = str(e)
    print(json.dumps({
        'package': mixer_jax.__file__,
        'configs_importable': importlib.util.find_spec('configs') is not None,
        'typo_error': typo_error,
        'saved_config': run_info.read_run_info(workdir)[
            'config'].to_json(sort_keys=True),
    }))
''')


def _copy_tracked_files(destination):
  """The checkout's files as git tracks them (with uncommitted edits)."""
  names = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others',
                          '--exclude-standard'], cwd=ROOT, check=True,
                         capture_output=True).stdout.decode().split('\0')
  for name in filter(None, names):
    source = os.path.join(ROOT, name)
    if not os.path.isfile(source):
      continue  # Deleted in the working tree.
    target = os.path.join(destination, name)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(source, 'rb') as f_in, open(target, 'wb') as f_out:
      f_out.write(f_in.read())


@pytest.fixture(scope='module')
def installed_python(tmp_path_factory):
  """The interpreter of a fresh venv with the wheel of the checkout."""
  base = tmp_path_factory.mktemp('installed')
  source, wheels, env_dir = base / 'source', base / 'wheels', base / 'venv'
  _copy_tracked_files(source)
  subprocess.run(
      [sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-index',
       '--no-build-isolation', '-q', '-w', str(wheels), str(source)],
      check=True, capture_output=True, timeout=300)
  (wheel,) = wheels.glob('mixer_jax-*.whl')
  venv.create(env_dir, with_pip=False)
  python = env_dir / 'bin' / 'python'
  fresh_site = subprocess.run(
      [str(python), '-c', 'import sysconfig; print(sysconfig.get_path('
       '"purelib"))'], check=True, capture_output=True, text=True
  ).stdout.strip()
  # The wheel goes into the fresh environment only (--target), never into
  # the shared one.
  subprocess.run(
      [sys.executable, '-m', 'pip', 'install', '--no-deps', '--no-index',
       '-q', '--target', fresh_site, str(wheel)],
      check=True, capture_output=True, timeout=300)
  with open(os.path.join(fresh_site, 'shared_dependencies.pth'), 'w') as f:
    f.write('\n'.join(site.getsitepackages()) + '\n')
  return str(python), fresh_site


def test_the_installed_package_refuses_typos_and_reads_saved_configs(
    installed_python, tmp_path):
  python, fresh_site = installed_python
  typo_file = tmp_path / 'typo.py'
  typo_file.write_text(textwrap.dedent('''
      from mixer_jax import config_defaults
      def get_config():
        config = config_defaults.get_config()
        config.learning_rat = 5.0
        return config
  '''))
  # A workdir saved by a run whose config lacked two fields that the
  # defaults define now (as a run from before they were added): reading it
  # fills them from the defaults.
  workdir = tmp_path / 'run'
  config = config_defaults.get_config()
  config.batch_size = 32
  config.evals.test = config_defaults.eval_entry(split='test')
  run_info.save_run_info(str(workdir), config, num_classes=10,
                               class_names=[str(i) for i in range(10)])
  info_path = workdir / run_info.RUN_INFO_FILE
  info = json.loads(info_path.read_text())
  del info['config']['ema_decay'], info['config']['pp']['eval_resize_method']
  info_path.write_text(json.dumps(info))
  in_checkout = run_info.read_run_info(str(workdir))['config']

  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  run = subprocess.run([python, '-c', _PROBE, str(typo_file), str(workdir)],
                       cwd=str(tmp_path), env=env, capture_output=True,
                       text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  probe = json.loads(run.stdout.strip().splitlines()[-1])
  assert probe['package'].startswith(fresh_site)
  assert not probe['configs_importable']
  assert probe['typo_error'] == (
      f'ConfigError: {typo_file}, line 5: Key "learning_rat" does not exist '
      'and cannot be added since the config is locked; Did you mean '
      '"learning_rate" instead of "learning_rat"?')
  assert probe['saved_config'] == in_checkout.to_json(sort_keys=True)
  saved = json.loads(probe['saved_config'])
  # The independent oracle: the saved values, and the defaults for the two
  # missing fields.
  assert saved['batch_size'] == 32 and saved['evals']['test']['split'] == 'test'
  assert saved['ema_decay'] == config_defaults.get_config().ema_decay
  assert saved['pp']['eval_resize_method'] == 'area'
