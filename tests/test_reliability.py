"""Fault injection across processes: kill -9, full disk, preemption, resume.

Each test starts real processes and injects the fault for real: SIGKILL in
the middle of an Orbax save, a file-size limit or a full tmpfs during a save,
SIGTERM to one of two `jax.distributed` processes, SIGTERM to
`python -m mixer_jax.train`, and a truncated newest checkpoint followed by
`--config.resume_step`. The in-process checks are in test_checkpoints.py.
"""

import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from mixer_jax import model_from_config
from mixer_jax import models
from mixer_jax.checkpointing import checkpoint_checks
from mixer_jax.checkpointing import checkpoints
from test_checkpoints import save_steps
from test_checkpoints import snapshot
from test_checkpoints import tiny_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The child scripts import the tests' helpers (test_checkpoints) as well.
REPO_AND_TESTS = os.pathsep.join([REPO, os.path.join(REPO, 'tests')])
CheckpointError = checkpoint_checks.CheckpointError


KILL_CHILD = textwrap.dedent('''
    import sys
    import numpy as np
    from mixer_jax.checkpointing import checkpoints
    ckpt = checkpoints.Checkpointer(sys.argv[1], keep=100, keep_best=False)
    def state(step):  # ~64 MB, so a save takes a noticeable time.
      return {'w': np.full((4, 2048, 2048), step, np.float32), 'step': step}
    ckpt.save(1, state(1))
    ckpt.wait_until_finished()
    print('READY', flush=True)
    for step in range(2, 1000):
      ckpt.save(step, state(step))
      ckpt.wait_until_finished()
      print('DONE', step, flush=True)
''')


@pytest.mark.parametrize('when', ['tmp_dir_seen', 'after_0.3s'])
def test_kill9_mid_save_leaves_a_restorable_latest(tmp_path, when):
  directory = str(tmp_path / 'ck')
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  child = subprocess.Popen([sys.executable, '-c', KILL_CHILD, directory],
                           stdout=subprocess.PIPE, env=env, text=True)
  try:
    assert child.stdout.readline().strip() == 'READY'
    saw_tmp = False
    deadline = time.time() + (0.3 if when.startswith('after') else 30)
    while time.time() < deadline:
      if glob.glob(os.path.join(directory, '*.orbax-checkpoint-tmp*')):
        saw_tmp = True
        if when == 'tmp_dir_seen':
          break
    os.kill(child.pid, signal.SIGKILL)
    child.wait(30)
  finally:
    if child.poll() is None:
      child.kill()
  done = [int(line.split()[1]) for line in child.stdout if line.startswith(
      'DONE')]
  last_done = done[-1] if done else 1
  if when == 'tmp_dir_seen':
    assert saw_tmp, 'the child was not killed in the middle of a save'
    assert glob.glob(os.path.join(directory, '*.orbax-checkpoint-tmp*'))

  # A new run: the half-written step is discarded, the last complete one
  # restores with its own values.
  ckpt = checkpoints.Checkpointer(directory, keep=100, keep_best=False)
  latest = ckpt.latest_step()
  assert latest in (last_done, last_done + 1)
  target = {'w': np.zeros((4, 2048, 2048), np.float32), 'step': 0}
  restored, extra = ckpt.restore(target)
  assert extra['step'] == latest and restored['step'] == latest
  assert np.all(restored['w'] == latest)
  assert_unfinished_saves_removed(directory)
  # Saving continues after it.
  assert ckpt.save(latest + 1, {'w': restored['w'] + 1, 'step': latest + 1})
  ckpt.close()


def assert_unfinished_saves_removed(directory):
  """Orbax removes them in the background when a writer opens `directory`."""
  deadline = time.time() + 30
  while (glob.glob(os.path.join(directory, '*.orbax-checkpoint-tmp*')) and
         time.time() < deadline):
    time.sleep(0.1)
  assert not glob.glob(os.path.join(directory, '*.orbax-checkpoint-tmp*'))


def run_on_a_small_tmpfs(tmp_path, script, size='2m', timeout=180):
  """Runs `python -c script DISK` with DISK a fresh tmpfs of `size`.

  The tmpfs is mounted in a private mount namespace (`unshare -m`, or
  `unshare -rm` as a user with user namespaces), so nothing needs cleaning
  up and a full disk gives real ENOSPC errors. Skips where neither works.
  """
  disk = tmp_path / 'disk'
  disk.mkdir()
  unshare = shutil.which('unshare')
  if unshare is None:
    pytest.skip('needs unshare(1) to mount a private tmpfs')
  namespace = ['-m'] if os.geteuid() == 0 else ['-r', '-m']
  shell = ('mount -t tmpfs -o size="$1" tmpfs "$2" || exit 99; '
           'exec "$3" -c "$4" "$2"')
  env = dict(os.environ, PYTHONPATH=REPO_AND_TESTS, JAX_PLATFORMS='cpu')
  out = subprocess.run([unshare] + namespace + [
      'sh', '-c', shell, 'sh', size, str(disk), sys.executable, script],
                       capture_output=True, text=True, env=env,
                       timeout=timeout)
  if out.returncode == 99 or (out.returncode and 'unshare' in out.stderr):
    pytest.skip(f'cannot mount a private tmpfs here: {out.stderr[-300:]}')
  return out


SPACE_CHECK_CHILD = textwrap.dedent('''
    import os, shutil, sys
    from test_checkpoints import save_steps, tiny_state
    from mixer_jax.checkpointing import checkpoint_checks
    disk = sys.argv[1]
    ckpt = save_steps(os.path.join(disk, 'ck'), [1])
    free = shutil.disk_usage(disk).free
    with open(os.path.join(disk, 'ballast'), 'wb') as f:  # Leave ~20 KB.
      f.write(b'\\0' * (free - 20_000))
    try:
      ckpt.save(2, tiny_state(offset=2))
    except checkpoint_checks.CheckpointError as e:
      print('ERROR', e)
    restored, _ = ckpt.restore(tiny_state())
    print('RESTORED', int(restored.step))
    ckpt.close()
''')


def test_full_disk_before_save_keeps_previous(tmp_path):
  out = run_on_a_small_tmpfs(tmp_path, SPACE_CHECK_CHILD)
  assert out.returncode == 0, out.stderr[-3000:]
  assert re.search(r'ERROR Not enough disk space.*Kept steps \[1\]',
                   out.stdout), out.stdout + out.stderr[-2000:]
  assert 'RESTORED 1' in out.stdout


ENOSPC_CHILD = textwrap.dedent('''
    import glob, os, shutil, sys, time
    import numpy as np
    from mixer_jax.checkpointing import checkpoint_checks
    from mixer_jax.checkpointing import checkpoints
    from mixer_jax.training import command_line
    command_line.quiet_library_logs()  # As the programs do.
    disk = sys.argv[1]
    directory = os.path.join(disk, 'ck')
    ckpt = checkpoints.Checkpointer(directory, keep=3, keep_best=False)
    ckpt.save(1, {'w': np.ones((1000,), np.float32)})
    ckpt.wait_until_finished()
    free = shutil.disk_usage(disk).free
    with open(os.path.join(disk, 'ballast'), 'wb') as f:  # Leave 64 KiB.
      f.write(b'\\0' * (free - 65536))
    # 8 KB of values passes the space check, but 400 leaves take far more
    # than 64 KiB on disk (per-leaf metadata): the disk fills mid-write.
    state = {f'leaf_{i:03d}': np.full((5,), i, np.float32) for i in range(400)}
    try:
      ckpt.save(2, state)
      print('SAVE RETURNED', flush=True)
      for step in range(3, 500):  # The training loop asks every step.
        ckpt.reached_preemption(step)
        time.sleep(0.02)
      print('NEVER RAISED')
    except checkpoint_checks.CheckpointError as e:
      print('ERROR', e)
    print('STEPS', ckpt.all_steps())
    restored, _ = ckpt.restore({'w': np.zeros((1000,), np.float32)})
    print('RESTORED', float(restored['w'][0]))
    ckpt.close()  # As the programs do on an error.
    # Space freed, the next start: Orbax removes the unfinished save.
    os.remove(os.path.join(disk, 'ballast'))
    checkpoints.Checkpointer(directory, keep=3, keep_best=False).close()
    for _ in range(300):
      left = sorted(glob.glob(os.path.join(directory, '*tmp*')))
      if not left:
        break
      time.sleep(0.1)
    print('LEFT', left)
''')


def test_disk_full_during_a_background_save(tmp_path):
  # The disk fills after the space check: the failed save is reported at
  # the next step (not many steps later), in one message without
  # tracebacks, the earlier step kept; the next start removes the partial
  # directory.
  out = run_on_a_small_tmpfs(tmp_path, ENOSPC_CHILD)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'ERROR Saving step 2' in out.stdout, out.stdout + out.stderr[-2000:]
  assert 'Earlier steps [1] are kept' in out.stdout
  assert 'LEFT []' in out.stdout and 'STEPS [1]' in out.stdout
  assert 'RESTORED 1.0' in out.stdout
  assert 'Traceback' not in out.stderr, out.stderr[-3000:]
  assert len(out.stderr.splitlines()) < 30, out.stderr[-3000:]


FULL_CHILD = textwrap.dedent('''
    import resource, signal, sys
    import numpy as np
    from mixer_jax.checkpointing import checkpoint_checks
    from mixer_jax.checkpointing import checkpoints
    from mixer_jax.training import command_line
    command_line.quiet_library_logs()  # As the programs do.
    ckpt = checkpoints.Checkpointer(sys.argv[1], keep=3, keep_best=False,
                                    async_save=sys.argv[2] == 'async')
    for step in (1, 2):
      ckpt.save(step, {'w': np.full((1000,), step, np.float32)})
      ckpt.wait_until_finished()
    # From now on no file may grow past 100 KB: writes fail like a full disk.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    try:
      ckpt.save(3, {'w': np.random.rand(1_000_000).astype(np.float32)})
      ckpt.wait_until_finished()
    except checkpoint_checks.CheckpointError as e:
      print('ERROR', e)
    print('STEPS', ckpt.all_steps())
''')


@pytest.mark.parametrize('mode', ['async', 'sync'])
def test_failed_write_keeps_previous_steps(tmp_path, mode):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', FULL_CHILD, str(tmp_path),
                        mode], capture_output=True, text=True, env=env,
                       timeout=120)
  # The failed step is named, and every step on disk is listed as kept.
  assert 'ERROR Saving step 3' in out.stdout, out.stdout + out.stderr[-2000:]
  assert 'Earlier steps [1, 2] are kept' in out.stdout
  assert 'STEPS [1, 2]' in out.stdout
  # Orbax's own reports are one line each, without tracebacks.
  assert 'Traceback' not in out.stderr, out.stderr[-3000:]
  assert len(out.stderr.splitlines()) < 30, out.stderr[-3000:]
  ckpt = checkpoints.Checkpointer(tmp_path, keep=3, keep_best=False)
  assert ckpt.all_steps() == [1, 2]
  restored, _ = ckpt.restore({'w': np.zeros((1000,), np.float32)})
  np.testing.assert_array_equal(restored['w'], 2.0)
  ckpt.close()
  assert_unfinished_saves_removed(tmp_path)
  assert sorted(os.listdir(tmp_path)) == ['1', '2']  # No partial step 3.



MULTIHOST_CHILD = textwrap.dedent('''
    import sys, time
    import jax
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=sys.argv[1],
                               num_processes=2, process_id=int(sys.argv[2]))
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from mixer_jax.checkpointing import checkpoints
    ckpt = checkpoints.Checkpointer(sys.argv[3], keep=2, keep_best=False)
    sharding = NamedSharding(Mesh(np.asarray(jax.devices()), ('data',)),
                             PartitionSpec('data'))
    print('READY', flush=True)
    for step in range(1, 100_000):
      time.sleep(0.01 * (1 + jax.process_index()))  # Hosts differ in speed.
      if ckpt.reached_preemption(step):
        local = np.full((jax.local_device_count(),), step, np.float32)
        ckpt.save(step, {'w': jax.make_array_from_process_local_data(
            sharding, local)})
        ckpt.close()
        print('STOP', step, flush=True)
        break
''')


def test_two_hosts_agree_on_the_preemption_step(tmp_path):
  # SIGTERM reaches only process 1; JAX's preemption sync service (through
  # Orbax) makes both processes stop and save at the same step.
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    port = sock.getsockname()[1]
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  children = [subprocess.Popen(
      [sys.executable, '-c', MULTIHOST_CHILD, f'127.0.0.1:{port}', str(i),
       str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
              for i in range(2)]
  try:
    for child in children:  # Gloo prints its own lines first.
      assert any(line.startswith('READY') for line in iter(
          child.stdout.readline, ''))
    time.sleep(0.5)
    os.kill(children[1].pid, signal.SIGTERM)
    outputs = [child.communicate(timeout=120)[0] for child in children]
  finally:
    for child in children:
      if child.poll() is None:
        child.kill()
  assert [child.returncode for child in children] == [0, 0], outputs
  stops = [[int(l.split()[1]) for l in out.splitlines() if l.startswith(
      'STOP')] for out in outputs]
  assert stops[0] == stops[1] and len(stops[0]) == 1, outputs
  ckpt = checkpoints.Checkpointer(tmp_path, keep=2, keep_best=False)
  assert ckpt.all_steps() == stops[0]
  restored, _ = ckpt.restore({'w': np.zeros((4,), np.float32)})
  np.testing.assert_array_equal(restored['w'], float(stops[0][0]))



TRAIN_FLAGS = ['--config=configs/quickstart.py', '--config.num_train_steps=60',
               '--config.model.num_blocks=1', '--config.model.hidden_dim=16',
               '--config.warmup_steps=5', '--config.log_every_steps=1',
               '--config.eval_every_steps=60',
               '--config.checkpoint_every_steps=1000']


def final_params(workdir):
  """Parameters of the last step saved in a quick-start workdir."""
  from configs import quickstart  # pylint: disable=g-import-not-at-top
  config = quickstart.get_config()
  config.model.num_blocks, config.model.hidden_dim = 1, 16
  shapes = models.param_shapes(model_from_config.create_model(config, 10), 8)
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                  keep=1, keep_best=False, read_only=True)
  params, extra = ckpt.restore_params(shapes)
  ckpt.close()
  return extra['step'], params


def quickstart_config(**fields):
  """configs/quickstart.py with TRAIN_FLAGS' overrides, built in-process."""
  from configs import quickstart  # pylint: disable=g-import-not-at-top
  config = quickstart.get_config()
  config.model.num_blocks, config.model.hidden_dim = 1, 16
  config.update(dict(num_train_steps=60, warmup_steps=5, log_every_steps=1,
                     eval_every_steps=60, checkpoint_every_steps=1000))
  config.update(fields)
  return config


@pytest.mark.slow
def test_sigterm_during_training_then_resume_matches_uninterrupted(tmp_path):
  # Only the interrupted run goes through the command line (the signal and
  # its exit status are what is tested); the resume and the uninterrupted
  # reference run in this process, which is quicker and computes the same.
  from mixer_jax.training import trainer  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  command = [sys.executable, '-m', 'mixer_jax.train'] + TRAIN_FLAGS
  stopped = tmp_path / 'stopped'
  child = subprocess.Popen(command + [f'--workdir={stopped}'], cwd=REPO,
                           env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  try:
    for line in child.stdout:  # Progress lines are on stdout.
      if 'step 5/60 ' in line:  # A progress line: the loop is running.
        child.send_signal(signal.SIGTERM)
        break
    output, errors = child.communicate(timeout=300)
  finally:
    if child.poll() is None:
      child.kill()
  assert child.returncode == 0, errors[-3000:]
  assert re.search(r'preempted +True', output), output[-3000:] + errors
  step, _ = final_params(stopped)
  assert 5 <= step < 60
  config = quickstart_config()
  resumed = trainer.train_and_evaluate(config, str(stopped))
  assert resumed['start_step'] == step and resumed['steps'] == 60
  plain = trainer.train_and_evaluate(config, str(tmp_path / 'plain'))
  assert plain['steps'] == 60
  (step_a, params_a), (step_b, params_b) = final_params(
      stopped), final_params(tmp_path / 'plain')
  assert step_a == step_b == 60
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                       atol=1e-7),
               params_a, params_b)


@pytest.mark.slow
def test_training_falls_back_to_an_earlier_step(tmp_path):
  # The first run (only the checkpoints matter) runs in this process; the
  # refused start and the fallback go through the command line, whose
  # messages are tested.
  from mixer_jax.training import trainer  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  short = ['--config.num_train_steps=20', '--config.eval_every_steps=20',
           '--config.checkpoint_every_steps=10']
  command = [sys.executable, '-m', 'mixer_jax.train', f'--workdir={tmp_path}'
            ] + TRAIN_FLAGS + short
  trainer.train_and_evaluate(quickstart_config(
      num_train_steps=20, eval_every_steps=20, checkpoint_every_steps=10),
                             str(tmp_path))
  data = sorted(glob.glob(str(tmp_path / 'checkpoints/20/state/**/d/*'),
                          recursive=True), key=os.path.getsize)[-1]
  with open(data, 'r+b') as f:
    f.truncate(10)
  damaged = snapshot(tmp_path / 'checkpoints' / '20')
  failed = subprocess.run(command, cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
  assert failed.returncode != 0
  # Which file the truncation hits decides whether the array metadata or the
  # array data fails to read; both messages name the step and the cause.
  assert re.search(rf'[Cc]heckpoint {re.escape(str(tmp_path))}/checkpoints/20'
                   r' [^\n]*corrupt[^\n]*truncated', failed.stderr)
  assert '--config.resume_step=K' in failed.stderr and '[10]' in failed.stderr
  assert 'Traceback' not in failed.stderr, failed.stderr[-3000:]
  resumed = subprocess.run(command + ['--config.resume_step=10'], cwd=REPO,
                           env=env, capture_output=True, text=True,
                           timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert re.search(r'start_step +10\n', resumed.stdout), resumed.stdout
  # The damaged step was moved aside byte for byte, not deleted.
  assert snapshot(tmp_path / 'checkpoints.set_aside' / '20') == damaged
  assert final_params(tmp_path)[0] == 20


ZERO_CHILD = textwrap.dedent('''
    import glob, os, sys
    from test_checkpoints import save_steps, tiny_state
    from mixer_jax.checkpointing import checkpoints
    from mixer_jax.checkpointing import checkpoint_checks
    from mixer_jax.checkpointing import echoes
    echoes.quiet_closed_loop_echoes()  # As every program's output set-up.
    save_steps(sys.argv[1], [1, 2]).close()
    for path in glob.glob(os.path.join(sys.argv[1], '2/state/ocdbt.*/d/*')):
      open(path, 'w').close()  # Zero-length array files.
    ckpt = checkpoints.Checkpointer(sys.argv[1], keep=3, keep_best=False)
    try:
      ckpt.restore(tiny_state())
    except checkpoint_checks.CheckpointError as e:
      print('ERROR', e, flush=True)
''')


def test_zero_length_array_files_give_only_the_clear_error(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO_AND_TESTS, JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', ZERO_CHILD, str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=120)
  assert f'ERROR Reading the arrays of checkpoint {tmp_path}/2' in out.stdout, (
      out.stdout + out.stderr[-2000:])
  assert 'resume_step=K' in out.stdout and '[1]' in out.stdout
  # Without the fix: thousands of 'Event loop is closed' traceback lines.
  assert 'Traceback' not in out.stderr, out.stderr[-3000:]
  assert 'Event loop is closed' not in out.stderr


@pytest.mark.slow
def test_predict_user_errors_have_no_traceback(tmp_path):
  from mixer_jax.weights import pretrained  # pylint: disable=g-import-not-at-top
  model = models.create_model('S_4', 10, num_blocks=1, hidden_dim=8,
                              tokens_mlp_dim=8, channels_mlp_dim=8)
  npz = str(tmp_path / 'tiny.npz')
  pretrained.export_official(
      models.init_params(model, jax.random.PRNGKey(0), 8), npz)
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  for flag, expected in [('--top_k=0', 'top_k'),
                         ('--labels=/missing/labels.txt',
                          '/missing/labels.txt: no such file')]:
    run = subprocess.run(
        [sys.executable, '-m', 'mixer_jax.predict', f'--checkpoint={npz}',
         flag, str(tmp_path / 'image.png')], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=300)
    assert run.returncode != 0, run.stdout
    assert expected in run.stderr, run.stderr[-3000:]
    assert 'Traceback' not in run.stderr, run.stderr[-3000:]


def test_training_refuses_a_workdir_held_by_a_live_job(tmp_path):
  from test_train import small_config  # pylint: disable=g-import-not-at-top
  from test_workdir_lock import start_holder  # pylint: disable=g-import-not-at-top
  from mixer_jax.training import trainer  # pylint: disable=g-import-not-at-top
  from mixer_jax.training import workdir_lock  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'run'
  holder = start_holder(workdir)
  try:
    with pytest.raises(workdir_lock.WorkdirLockedError,
                       match=f'in use by process {holder.pid} on host'):
      trainer.train_and_evaluate(small_config(str(tmp_path / 'tfds')),
                               str(workdir))
  finally:
    holder.kill()
    holder.wait(30)
  assert os.listdir(workdir) == [workdir_lock.LOCK_FILE]  # Nothing written.


class _Guard:
  """A SIGTERM handler that records the signal instead of ending pytest."""

  def __init__(self):
    self.calls = 0

  def __call__(self, signum, frame):
    del signum, frame
    self.calls += 1


def _sigterm_inside(monkeypatch, owner, name):
  """Makes owner.name send this process SIGTERM, then run as before."""
  original = getattr(owner, name)

  def sending(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, **kwargs)

  monkeypatch.setattr(owner, name, sending)


def _tiny_config(tmp_path, **overrides):
  from test_train import small_config  # pylint: disable=g-import-not-at-top
  config = small_config(str(tmp_path / 'tfds'), **{
      'num_train_steps': 4, 'log_every_steps': 4, **overrides})
  config.model.num_blocks, config.model.hidden_dim = 1, 16
  return config


def test_sigterm_during_setup_of_a_fresh_run_stops_at_step_0(tmp_path,
                                                             monkeypatch):
  from mixer_jax.training import compiled  # pylint: disable=g-import-not-at-top
  from mixer_jax.training import trainer  # pylint: disable=g-import-not-at-top
  guard = _Guard()  # Without the fix the signal lands here and it trains.
  before = signal.signal(signal.SIGTERM, guard)
  try:
    workdir = str(tmp_path / 'run')
    _sigterm_inside(monkeypatch, compiled, 'build')
    summary = trainer.train_and_evaluate(_tiny_config(tmp_path), workdir)
    assert summary['preempted'] and summary['steps'] == 0
    assert summary['last_checkpoint_step'] is None
    assert not glob.glob(os.path.join(workdir, 'checkpoints', '[0-9]*'))
    assert guard.calls == 0  # The run took the signal, not the old handler.
    assert signal.getsignal(signal.SIGTERM) is guard  # And gave it back.
  finally:
    signal.signal(signal.SIGTERM, before)


def test_sigterm_during_restore_stops_where_it_was(tmp_path, monkeypatch):
  from mixer_jax.training import trainer  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  config = _tiny_config(tmp_path)
  assert trainer.train_and_evaluate(config, workdir)['steps'] == 4
  saved = snapshot(os.path.join(workdir, 'checkpoints', '4'))
  guard = _Guard()
  before = signal.signal(signal.SIGTERM, guard)
  try:
    config.num_train_steps = 8  # Train on: a longer schedule, knowingly.
    config.allow_changed_schedule = True
    _sigterm_inside(monkeypatch, checkpoints.Checkpointer, 'restore')
    summary = trainer.train_and_evaluate(config, workdir)
    assert summary['preempted'] and summary['start_step'] == 4
    assert summary['steps'] == 4 and summary['last_checkpoint_step'] == 4
    assert guard.calls == 0
    assert signal.getsignal(signal.SIGTERM) is guard
  finally:
    signal.signal(signal.SIGTERM, before)
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                  keep=5, keep_best=False, read_only=True)
  assert ckpt.all_steps() == [4]  # Nothing new saved, nothing lost.
  ckpt.close()
  assert snapshot(os.path.join(workdir, 'checkpoints', '4')) == saved


def _sigterm_at(tmp_path, marker, *flags):
  """Runs train, sends SIGTERM when a line holds `marker`; (output, rc)."""
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  child = subprocess.Popen(
      [sys.executable, '-m', 'mixer_jax.train', f'--workdir={tmp_path / "run"}',
       f'--config.data_dir={tmp_path / "tfds"}'] + TRAIN_FLAGS + list(flags),
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)
  lines = []
  try:
    for line in child.stdout:
      lines.append(line)
      if marker in line:
        child.send_signal(signal.SIGTERM)
        break
    # Well within the compilation's own time (a bound against a hang).
    lines.append(child.communicate(timeout=60)[0])
  finally:
    if child.poll() is None:
      child.kill()
  return ''.join(lines), child.returncode


STOPPED = ('Received SIGTERM before the first training step: stopped at '
           'once, nothing new to save. The same command starts (or resumes) '
           'the run again.')


@pytest.mark.parametrize('marker, flags', [
    # Before restore or initialisation.
    (' parameters, ', ()),
    # Inside XLA's compiler: this model's train step compiles for several
    # seconds, where no Python signal handler runs.
    ('Compiling the train step', ('--config.model.num_blocks=8',)),
])
def test_command_line_sigterm_before_the_first_step_stops_at_once(
    tmp_path, marker, flags):
  output, returncode = _sigterm_at(tmp_path, marker, *flags)
  assert returncode == 0, output[-3000:]
  assert STOPPED in output.splitlines(), output[-3000:]
  assert 'First step' not in output and 'Training summary' not in output
  assert not glob.glob(str(tmp_path / 'run' / 'checkpoints' / '*'))


def test_resumed_run_leaves_one_record_per_step(tmp_path):
  # State after a kill -9: metrics of steps 4-6 written, their checkpoint
  # not, and the last line cut in the middle.
  from mixer_jax.training import reporting  # pylint: disable=g-import-not-at-top
  from mixer_jax.training import trainer  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  config = _tiny_config(tmp_path, num_train_steps=6, log_every_steps=1,
                        checkpoint_every_steps=3)
  trainer.train_and_evaluate(config, workdir)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '6'))
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
    f.write('{"step": 7, "train_loss": 0.')
  summary = trainer.train_and_evaluate(config, workdir)
  assert summary['start_step'] == 3 and summary['steps'] == 6
  records = reporting.read_metrics(workdir)
  assert [r['step'] for r in records if 'train_loss' in r] == [1, 2, 3, 4, 5,
                                                                6]
  assert [r['step'] for r in records if 'eval_accuracy' in r] == [6]
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = f.read().splitlines()
  assert sum('"hparams"' in line for line in lines) == 1
  assert all(line.startswith('{') and line.endswith('}') for line in lines)
