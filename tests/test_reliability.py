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

from mixer_jax import checkpoints
from mixer_jax import models
from test_checkpoints import save_steps
from test_checkpoints import snapshot
from test_checkpoints import tiny_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CheckpointError = checkpoints.CheckpointError


KILL_CHILD = textwrap.dedent('''
    import sys
    import numpy as np
    from mixer_jax import checkpoints
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
  assert not glob.glob(os.path.join(directory, '*.orbax-checkpoint-tmp*'))
  # Saving continues after it.
  assert ckpt.save(latest + 1, {'w': restored['w'] + 1, 'step': latest + 1})
  ckpt.close()



def test_full_disk_before_save_keeps_previous(tmp_path):
  if os.geteuid() != 0:
    pytest.skip('needs root to mount a small tmpfs')
  disk = tmp_path / 'disk'
  disk.mkdir()
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=2m', 'tmpfs',
                     str(disk)], capture_output=True).returncode:
    pytest.skip('cannot mount tmpfs here')
  try:
    ckpt = save_steps(disk, [1])
    free = shutil.disk_usage(disk).free
    with open(disk / 'ballast', 'wb') as f:  # Leave ~20 KB free.
      f.write(b'\0' * (free - 20_000))
    with pytest.raises(CheckpointError, match='Not enough disk space.*'
                       r'Kept steps \[1\]'):
      ckpt.save(2, tiny_state(offset=2))
    restored, _ = ckpt.restore(tiny_state())
    assert int(restored.step) == 1
    ckpt.close()
  finally:
    subprocess.run(['umount', str(disk)], check=True)


FULL_CHILD = textwrap.dedent('''
    import resource, signal, sys
    import numpy as np
    from mixer_jax import checkpoints
    ckpt = checkpoints.Checkpointer(sys.argv[1], keep=3, keep_best=False)
    ckpt.save(1, {'w': np.ones((1000,), np.float32)})
    ckpt.wait_until_finished()
    # From now on no file may grow past 100 KB: writes fail like a full disk.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    try:
      ckpt.save(2, {'w': np.random.rand(1_000_000).astype(np.float32)})
      ckpt.wait_until_finished()
    except checkpoints.CheckpointError as e:
      print('ERROR', e)
    print('STEPS', ckpt.all_steps())
''')


def test_failed_write_keeps_previous_steps(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', FULL_CHILD, str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=120)
  assert 'ERROR Saving step' in out.stdout, out.stdout + out.stderr[-2000:]
  assert 'STEPS [1]' in out.stdout
  ckpt = checkpoints.Checkpointer(tmp_path, keep=3, keep_best=False)
  assert ckpt.all_steps() == [1]
  restored, _ = ckpt.restore({'w': np.zeros((1000,), np.float32)})
  np.testing.assert_array_equal(restored['w'], 1.0)



MULTIHOST_CHILD = textwrap.dedent('''
    import sys, time
    import jax
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=sys.argv[1],
                               num_processes=2, process_id=int(sys.argv[2]))
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from mixer_jax import checkpoints
    ckpt = checkpoints.Checkpointer(sys.argv[3], keep=2, keep_best=False)
    sharding = NamedSharding(Mesh(np.asarray(jax.devices()), ('data',)),
                             PartitionSpec('data'))
    print('READY', flush=True)
    for step in range(1, 100_000):
      time.sleep(0.01 * (1 + jax.process_index()))  # Hosts differ in speed.
      if ckpt.reached_preemption(step):
        local = np.full((jax.local_device_count(),), step, np.float32)
        ckpt.save(step, {'w': jax.make_array_from_process_local_data(
            sharding, local)}, force=True)
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
  from mixer_jax import train  # pylint: disable=g-import-not-at-top
  config = quickstart.get_config()
  config.model.num_blocks, config.model.hidden_dim = 1, 16
  shapes = models.param_shapes(train.create_model(config, 10), 8)
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                  keep=1, keep_best=False, read_only=True)
  params, extra = ckpt.restore_params(shapes)
  ckpt.close()
  return extra['step'], params


@pytest.mark.slow
def test_sigterm_during_training_then_resume_matches_uninterrupted(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  command = [sys.executable, '-m', 'mixer_jax.train'] + TRAIN_FLAGS
  stopped = tmp_path / 'stopped'
  child = subprocess.Popen(command + [f'--workdir={stopped}'], cwd=REPO,
                           env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
  try:
    for line in child.stdout:
      if 'step 5/60 ' in line:  # A progress line: the loop is running.
        child.send_signal(signal.SIGTERM)
        break
    output = child.communicate(timeout=300)[0]
  finally:
    if child.poll() is None:
      child.kill()
  assert child.returncode == 0, output[-3000:]
  assert 'preempted                True' in output, output[-3000:]
  step, _ = final_params(stopped)
  assert 5 <= step < 60
  resumed = subprocess.run(command + [f'--workdir={stopped}'], cwd=REPO,
                           env=env, capture_output=True, text=True,
                           timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'start_step               {step}' in resumed.stderr + resumed.stdout
  plain = subprocess.run(command + [f'--workdir={tmp_path / "plain"}'],
                         cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
  assert plain.returncode == 0, plain.stderr[-3000:]
  (step_a, params_a), (step_b, params_b) = final_params(
      stopped), final_params(tmp_path / 'plain')
  assert step_a == step_b == 60
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                       atol=1e-7),
               params_a, params_b)


@pytest.mark.slow
def test_training_falls_back_to_an_earlier_step(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  command = [sys.executable, '-m', 'mixer_jax.train', f'--workdir={tmp_path}'
            ] + TRAIN_FLAGS + ['--config.num_train_steps=20',
                               '--config.eval_every_steps=20',
                               '--config.checkpoint_every_steps=10']
  first = subprocess.run(command, cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
  assert first.returncode == 0, first.stderr[-3000:]
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
  resumed = subprocess.run(command + ['--config.resume_step=10'], cwd=REPO,
                           env=env, capture_output=True, text=True,
                           timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'start_step               10' in resumed.stderr + resumed.stdout
  # The damaged step was moved aside byte for byte, not deleted.
  assert snapshot(tmp_path / 'checkpoints.set_aside' / '20') == damaged
  assert final_params(tmp_path)[0] == 20
