"""A start of `train` that is refused changes nothing on disk.

Each refused start (another model, another schedule, a held workdir, an
invalid config) is made on a finished run's workdir, whose every file is
compared byte for byte before and after; the workdir then still resumes.
"""

import copy
import os
import re
import shutil
import subprocess
import sys

import jax
import pytest

from mixer_jax.checkpointing import checkpoint_checks
from mixer_jax.training import config_validation
from mixer_jax.training import trainer
from mixer_jax.training import workdir_lock
import run_state
from test_checkpoints import snapshot
from test_export import BLOCK_MODULE
from test_train import small_config
from test_workdir_lock import start_holder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The quick start at hidden_dim D has 1069 D + 4810 parameters (hand count:
# stem 13 D, 4 blocks of 261 D + 1200, final norm 2 D, head 10 D + 10).
HUGE_PARAMS = 1069 * 100_000_000 + 4810


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  root = tmp_path_factory.mktemp('refused')
  config = small_config(str(root / 'tfds'), num_train_steps=4,
                        log_every_steps=4, eval_every_steps=4)
  config.model.num_blocks, config.model.hidden_dim = 1, 16
  workdir = root / 'run'
  assert trainer.train_and_evaluate(config, str(workdir))['steps'] == 4
  return config, workdir


def _changed(config, **fields):
  config = copy.deepcopy(config)
  for name, value in fields.items():
    target = config
    *parents, leaf = name.split('.')
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


@pytest.mark.parametrize('fields, error, match', [
    ({'model.hidden_dim': 32}, checkpoint_checks.CheckpointError,
     'hidden_dim'),
    ({'batch_size': 32}, config_validation.ConfigError, 'batch_size 64 -> 32'),
    ({'num_train_steps': 8}, config_validation.ConfigError,
     'num_train_steps 4 -> 8'),
    ({'learning_rate': -1.0}, config_validation.ConfigError, 'learning_rate'),
])
def test_a_refused_start_changes_nothing(finished_run, fields, error, match):
  config, workdir = finished_run
  before = snapshot(workdir)
  with pytest.raises(error, match=match):
    trainer.train_and_evaluate(_changed(config, **fields), str(workdir))
  assert snapshot(workdir) == before


def test_a_finished_workdir_says_so_before_compiling(finished_run, capsys):
  config, workdir = finished_run
  before = snapshot(workdir)
  with run_state.compilations() as compiled:
    summary = trainer.train_and_evaluate(config, str(workdir))
  assert summary['already_finished'] and summary['steps'] == 4
  assert summary['checkpoint_dir'] == os.path.join(workdir, 'checkpoints')
  out = capsys.readouterr().out
  assert f'{workdir} already finished at step 4 of 4; nothing to train.' in out
  assert 'Resumed from' not in out
  # Nothing trained: only the restore's checksum pass was compiled.
  assert set(compiled) <= {'jit(_leaf_digests)'}, compiled
  assert snapshot(workdir) == before


def test_a_start_on_a_held_workdir_changes_nothing(finished_run):
  config, workdir = finished_run
  holder = start_holder(workdir)
  try:
    before = snapshot(workdir)  # With the holder's own lock file.
    with pytest.raises(workdir_lock.WorkdirLockedError):
      trainer.train_and_evaluate(config, str(workdir))
    assert snapshot(workdir) == before
  finally:
    holder.kill()
    holder.wait(30)


def test_a_refused_start_in_a_new_directory_leaves_no_directory(tmp_path,
                                                               finished_run):
  config, workdir = finished_run
  # A fresh workdir whose checkpoint directory cannot be made: refused after
  # the lock was taken; the directories made for the lock go again.
  workdir_file = tmp_path / 'new' / 'run'
  workdir_file.parent.mkdir()
  (workdir_file.parent / 'run').mkdir()
  (workdir_file / 'checkpoints').write_text('a file, not a directory')
  before = snapshot(tmp_path)
  with pytest.raises(checkpoint_checks.CheckpointError, match='not writable'):
    trainer.train_and_evaluate(config, str(workdir_file))
  assert snapshot(tmp_path) == before
  assert sorted(os.listdir(workdir_file)) == ['checkpoints']


def test_a_step_that_is_a_broken_link_is_refused(finished_run, tmp_path):
  config, workdir = finished_run
  copy_dir = tmp_path / 'copy'
  shutil.copytree(workdir, copy_dir)
  step = copy_dir / 'checkpoints' / '4'
  shutil.rmtree(step)
  os.symlink('/mnt/gone/4', step)  # Its disk not mounted: the only step.
  before, names = snapshot(copy_dir), sorted(os.listdir(copy_dir))
  with pytest.raises(checkpoint_checks.CheckpointError) as error:
    trainer.train_and_evaluate(config, str(copy_dir))
  assert str(error.value) == (
      f'{step} is a symbolic link that cannot be followed: step 4 cannot be '
      f'read. Fix it, or move it out of {step.parent} to train from the '
      'steps before it. Nothing was changed.')
  assert snapshot(copy_dir) == before
  assert sorted(os.listdir(copy_dir)) == names
  assert os.readlink(step) == '/mnt/gone/4'


def test_allow_changed_schedule_resumes(finished_run, tmp_path):
  config, workdir = finished_run
  copy_dir = tmp_path / 'copy'
  shutil.copytree(workdir, copy_dir)
  longer = _changed(config, num_train_steps=6, allow_changed_schedule=True)
  summary = trainer.train_and_evaluate(longer, str(copy_dir))
  assert summary['start_step'] == 4 and summary['steps'] == 6


def test_a_workdir_that_is_a_file_is_named_as_such(finished_run, tmp_path):
  config, _ = finished_run
  path = tmp_path / 'notes.txt'
  path.write_text('not a workdir')
  with pytest.raises(checkpoint_checks.CheckpointError,
                     match='is a file, not a directory'):
    trainer.train_and_evaluate(config, str(path))
  assert path.read_text() == 'not a workdir'


@pytest.mark.parametrize('flag, expected, exists', [
    ('--config.model.hidden_dim=100000000',
     f"The model's {HUGE_PARAMS:,} parameters and their optimizer state need "
     # Parameters, Adam's two moments, float32, on each (replicated) device.
     f'{12 * HUGE_PARAMS * jax.device_count() / 2**30:,.1f} GiB, more than '
     f'the {os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30:,.1f}'
     ' GiB of memory of this host: use a smaller model. Nothing was written.',
     False),
    ('--config.batch_size=1000000000',
     "batch_size=1,000,000,000 is larger than train_split='train[:90%]' "
     '(1,294 examples of digits); use a batch_size of at most 1,294 or a '
     'larger split.', True),
])
def test_a_run_that_cannot_fit_is_refused_before_writing(tmp_path, flag,
                                                         expected, exists):
  workdir = tmp_path / 'run'
  if exists:
    workdir.mkdir()
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  run = subprocess.run(
      [sys.executable, '-m', 'mixer_jax.train', '--config=configs/quickstart.py',
       f'--workdir={workdir}', f'--config.data_dir={tmp_path / "tfds"}',
       flag], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 1, run.stderr[-3000:]
  assert run.stderr.splitlines()[-1] == f'ConfigError: {expected}'
  assert 'Traceback' not in run.stderr
  assert (os.listdir(workdir) == []) if exists else not workdir.exists()


@pytest.mark.parametrize('program, args', [
    ('train', ['--config=configs/quickstart.py', '--workdir={new}']),
    ('predict', ['--checkpoint={run}', '{run}']),
])
def test_without_tensorflow_one_line_names_the_extra(finished_run, tmp_path,
                                                     program, args):
  _, workdir = finished_run
  before = snapshot(workdir)
  run = subprocess.run(
      [sys.executable, '-c', BLOCK_MODULE, 'tensorflow', program] +
      [a.format(new=tmp_path / 'new', run=workdir) for a in args],
      cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu'),
      capture_output=True, text=True, timeout=120)
  assert run.returncode == 1, run.stderr[-3000:]
  assert run.stderr.splitlines()[-1] == (
      'UsageError: TensorFlow is not installed (it reads data and weight '
      "files): pip install 'mixer_jax[tf]'. Nothing was written.")
  assert 'Traceback' not in run.stderr
  assert os.listdir(tmp_path) == [] and snapshot(workdir) == before
