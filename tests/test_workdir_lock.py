"""Tests for mixer_jax.training.workdir_lock with real second processes."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
from unittest import mock

import pytest

from mixer_jax.training import workdir_lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOLDER = textwrap.dedent('''
    import sys, time
    from mixer_jax.training import workdir_lock
    lock = workdir_lock.acquire(sys.argv[1])
    print('LOCKED', flush=True)
    time.sleep(600)
''')


def start_holder(workdir):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  child = subprocess.Popen([sys.executable, '-c', HOLDER, str(workdir)],
                           stdout=subprocess.PIPE, text=True, env=env)
  assert child.stdout.readline().strip() == 'LOCKED'
  return child


def test_second_start_is_refused_naming_the_owner_and_kill9_frees_it(
    tmp_path):
  child = start_holder(tmp_path)
  try:
    with pytest.raises(workdir_lock.WorkdirLockedError) as error:
      workdir_lock.acquire(tmp_path)
    message = str(error.value)
    assert f'process {child.pid} on host {socket.gethostname()}' in message
    assert str(tmp_path) in message and 'another --workdir' in message
    # Other hosts of a multi-host run do not lock (process 0 does).
    with mock.patch.object(workdir_lock.jax, 'process_index', lambda: 1):
      assert workdir_lock.acquire(tmp_path) is None
  finally:
    os.kill(child.pid, signal.SIGKILL)
    child.wait(30)
  # The crashed holder left its lock file, but not a held lock.
  assert os.path.exists(tmp_path / workdir_lock.LOCK_FILE)
  lock = workdir_lock.acquire(tmp_path)
  assert f'"pid": {os.getpid()}' in (tmp_path / workdir_lock.LOCK_FILE
                                    ).read_text()
  lock.release()
  workdir_lock.acquire(tmp_path).release()  # Reusable.


def test_unwritable_workdir_is_a_clear_error(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  with pytest.raises(workdir_lock.checkpoint_checks.CheckpointError,
                     match='a_file/run is not writable'):
    workdir_lock.acquire(blocker / 'run')
