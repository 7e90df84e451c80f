"""What every program does alike (mixer_jax.training.command_line).

The answer alone on stdout, library noise off unless --verbose, a user
error in one line without --help, and any other error with its traceback.
"""

import logging as pylogging
import os
import subprocess
import sys
import textwrap

from absl import logging as absl_logging
import pytest

from mixer_jax.training import command_line
from mixer_jax.training import trainer
from test_train import small_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_library_logs_are_dropped_up_to_the_level():
  command_line.quiet_library_logs()
  command_line.quiet_library_logs()  # Idempotent: one filter.
  handler = absl_logging.get_absl_handler()
  assert len([f for f in handler.filters
              if isinstance(f, command_line.DropLibraryLogs)]) == 1

  def record(path, level):
    return pylogging.LogRecord('absl', level, path, 1, 'msg', None, None)

  orbax_file = os.path.join(os.sep, 'venv', 'orbax', 'checkpoint', 'x.py')
  ours = os.path.join(os.sep, 'repo', 'mixer_jax', 'reporting.py')
  assert not handler.filter(record(orbax_file, pylogging.INFO))
  assert handler.filter(record(orbax_file, pylogging.WARNING))
  assert handler.filter(record(ours, pylogging.INFO))
  command_line.quiet_library_logs(pylogging.WARNING)  # The programs' level.
  assert not handler.filter(record(orbax_file, pylogging.WARNING))
  assert handler.filter(record(orbax_file, pylogging.ERROR))
  command_line.quiet_library_logs()  # Back to the test default.


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  root = tmp_path_factory.mktemp('cli')
  config = small_config(str(root / 'tfds'), num_train_steps=4,
                        log_every_steps=4)
  config.model.num_blocks, config.model.hidden_dim = 1, 16
  trainer.train_and_evaluate(config, str(root / 'run'))
  return root / 'run'


def _run(args, **kwargs):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  env.pop('TF_CPP_MIN_LOG_LEVEL', None)  # As a user's shell: unset.
  return subprocess.run([sys.executable] + args, cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300, **kwargs)


@pytest.mark.slow
def test_evaluate_output_is_the_answer_and_user_errors_one_line(workdir):
  quiet = _run(['-m', 'mixer_jax.evaluate', f'--checkpoint={workdir}'])
  assert quiet.returncode == 0, quiet.stderr[-3000:]
  assert quiet.stdout.count('\n') == 1 and 'top-1' in quiet.stdout
  assert quiet.stderr == '', quiet.stderr[-3000:]
  verbose = _run(['-m', 'mixer_jax.evaluate', f'--checkpoint={workdir}',
                  '--verbose'])
  assert verbose.returncode == 0 and verbose.stdout == quiet.stdout.replace(
      quiet.stdout.split('(')[-1], verbose.stdout.split('(')[-1])
  assert 'checkpoint_manager.py' in verbose.stderr  # Orbax's logs are back.
  for args, error in [(['--step=999'], 'CheckpointError: Step 999 is not'),
                      (['unexpected'], 'UsageError: Unexpected arguments')]:
    refused = _run(['-m', 'mixer_jax.evaluate', f'--checkpoint={workdir}']
                   + args)
    assert refused.returncode == 1
    assert refused.stderr.startswith(error), refused.stderr[-3000:]
    assert refused.stderr.count('\n') == 1  # No --help before it.


INJECTED = textwrap.dedent('''
    import runpy, sys
    from mixer_jax.training import evals
    def broken(*args, **kwargs):  # A bug deep inside, e.g. a sharding one.
      raise ValueError('injected bug inside the evaluation')
    evals.evaluate_dataset = broken
    sys.argv = ['evaluate', '--checkpoint=' + sys.argv[1]]
    runpy.run_module('mixer_jax.evaluate', run_name='__main__')
''')


@pytest.mark.slow
def test_an_unexpected_error_inside_evaluate_keeps_its_traceback(workdir):
  # A ValueError that is not one of the project's user errors is a bug: it
  # must not look like a user mistake.
  run = _run(['-c', INJECTED, str(workdir)])
  assert run.returncode != 0
  assert 'Traceback (most recent call last)' in run.stderr, run.stderr[-3000:]
  assert 'ValueError: injected bug inside the evaluation' in run.stderr


def test_warnings_are_plain_lines_and_cloud_auth_noise_is_off(tmp_path):
  import mixer_reference as ref  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  checkpoint = str(tmp_path / 'c.npz')
  np.savez(checkpoint, **ref.official_checkpoint(0, classes=10))
  image = str(tmp_path / 'rgba.png')
  Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(image)
  run = _run(['-m', 'mixer_jax.predict', f'--checkpoint={checkpoint}', image])
  assert run.returncode == 0, run.stderr[-3000:]
  assert run.stderr == (f'WARNING: {image} has an alpha channel; it is '
                        'ignored (the image is read as RGB, as in '
                        'training).\n')
  # A gs:// path: TensorFlow's Google Cloud client warns when it finds no
  # credentials (and fails without network); one line of ours, no noise.
  absent = 'gs://mixer-jax-no-such-bucket/absent.npz'
  run = _run(['-m', 'mixer_jax.predict', f'--checkpoint={absent}', image])
  assert run.returncode == 1, run.stderr[-3000:]
  assert run.stderr.startswith(f'Cannot use --checkpoint={absent}: '
                               'CheckpointNotFoundError: ')
  assert run.stderr.count('\n') == 1, run.stderr


def test_library_retries_are_shown_once():
  # huggingface_hub prints with its own handler and also passes records on.
  program = textwrap.dedent('''
      from absl import app
      from huggingface_hub.utils import logging
      from mixer_jax.training import command_line
      def main(_):  # As the programs run.
        command_line.set_up_output(False)
        logging.get_logger('huggingface_hub.utils._http').warning(
            'Retrying in 1s [Retry 1/5].')
      app.run(main)
  ''')
  run = _run(['-c', program])
  assert run.returncode == 0, run.stderr[-3000:]
  assert run.stderr == 'Retrying in 1s [Retry 1/5].\n'
