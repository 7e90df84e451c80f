"""Tests for mixer_jax.checkpointing.checkpoints: each fault is injected for real.

Saves and restores a small Flax TrainState (tiny Mixer + Adam) built here,
truncates, garbles and swaps checkpoint files, changes the model, makes the
directory unwritable and sends SIGTERM/SIGINT, and checks that the errors name
the step directory and that earlier steps survive. Faults that need other
processes (kill -9, full disk, two hosts, training) are in
test_reliability.py.
"""

import asyncio
import functools
import glob
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np
import optax
from flax.training import train_state
import pytest

from mixer_jax.checkpointing import checkpoint_checks as checks
from mixer_jax.checkpointing import checkpoints
from mixer_jax.checkpointing import echoes
from mixer_jax import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CheckpointError = checks.CheckpointError


@functools.lru_cache(maxsize=None)
def _initial_state(hidden_dim):
  model = models.create_model('S_4', 10, num_blocks=2, hidden_dim=hidden_dim,
                              tokens_mlp_dim=16, channels_mlp_dim=64)

  def create():  # Jitted: eager Flax init compiles op by op, which is slow.
    params = models.init_params(model, jax.random.PRNGKey(0), 16)
    return train_state.TrainState.create(
        apply_fn=model.apply, params=params, tx=optax.adam(1e-3))

  return jax.jit(create)()


def tiny_state(hidden_dim=32, offset=0):
  """A TrainState of a 2-block Mixer on 16x16 images, params + offset."""
  state = _initial_state(hidden_dim)
  return state.replace(params=jax.tree.map(lambda x: x + offset, state.params),
                       step=jnp.asarray(offset, jnp.int32))


def assert_trees_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(
      np.asarray(x), np.asarray(y)), a, b)


def snapshot(directory):
  """{relative path: bytes} of every file under `directory`."""
  out = {}
  for path in glob.glob(os.path.join(directory, '**'), recursive=True):
    if os.path.isfile(path):
      with open(path, 'rb') as f:
        out[os.path.relpath(path, directory)] = f.read()
  return out


def save_steps(directory, steps, keep=3, **kwargs):
  ckpt = checkpoints.Checkpointer(directory, keep=keep, keep_best=False,
                                  **kwargs)
  for step in steps:
    assert ckpt.save(step, tiny_state(offset=step), extra={'pos': step * 10})
  ckpt.wait_until_finished()
  return ckpt


def test_roundtrip_concrete_abstract_and_resharded(tmp_path):
  mesh8 = Mesh(np.asarray(jax.devices()), ('data',))
  state = jax.device_put(tiny_state(offset=5),
                         NamedSharding(mesh8, PartitionSpec()))
  ckpt = checkpoints.Checkpointer(tmp_path / 'ck', keep=2, keep_best=False)
  assert ckpt.latest_step() is None
  assert ckpt.save(5, state, extra={'data_step': 5, 'note': 'x'})
  ckpt.close()  # Async: close waits for the write.

  ckpt = checkpoints.Checkpointer(tmp_path / 'ck', keep=2, keep_best=False)
  assert ckpt.latest_step() == 5
  restored, extra = ckpt.restore(tiny_state())  # Concrete target.
  assert_trees_equal(restored.params, state.params)
  assert_trees_equal(restored.opt_state, state.opt_state)
  assert int(restored.step) == 5
  assert extra['data_step'] == 5 and extra['note'] == 'x' and extra['step'] == 5

  # Abstract target on another mesh (4 devices): resumes on a new topology.
  mesh4 = Mesh(np.asarray(jax.devices()[:4]), ('data',))
  sharding = NamedSharding(mesh4, PartitionSpec())
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      jax.eval_shape(tiny_state))
  restored, _ = ckpt.restore(abstract)
  assert_trees_equal(restored.params, state.params)
  leaf = restored.params['stem']['kernel']
  assert isinstance(leaf, jax.Array) and leaf.sharding == sharding
  ckpt.close()


def test_keeps_last_n_plus_best(tmp_path):
  ckpt = checkpoints.Checkpointer(tmp_path, keep=2, keep_best=True,
                                  async_save=False)
  accuracies = {1: 0.3, 2: 0.9, 3: 0.2, 4: None, 5: 0.5, 6: 0.4}
  for step, acc in accuracies.items():
    metrics = None if acc is None else {'eval_accuracy': acc, 'loss': 1.0}
    ckpt.save(step, tiny_state(offset=step), metrics=metrics)
  # The two latest (5, 6) plus the best (2, accuracy 0.9).
  assert ckpt.all_steps() == [2, 5, 6]
  restored, _ = ckpt.restore(tiny_state(), step=2)
  assert int(restored.step) == 2
  ckpt.close()


def test_existing_step_is_never_overwritten(tmp_path):
  ckpt = save_steps(tmp_path, [1, 2])
  before = snapshot(tmp_path)
  assert not ckpt.save(2, tiny_state(offset=7))  # Not newer: skipped.
  assert not ckpt.save(1, tiny_state(offset=7))
  ckpt.wait_until_finished()
  assert snapshot(tmp_path) == before


# Orbax leaves the reads of the other arrays un-awaited when one fails.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_truncated_file_errors_and_falls_back(tmp_path):
  save_steps(tmp_path, [1, 2]).close()
  data = sorted(glob.glob(str(tmp_path / '2/state/**/d/*'), recursive=True),
                key=os.path.getsize)[-1]
  with open(data, 'r+b') as f:
    f.truncate(os.path.getsize(data) // 2)
  before = snapshot(tmp_path)
  ckpt = checkpoints.Checkpointer(tmp_path, keep=3, keep_best=False)
  with pytest.raises(CheckpointError) as error:
    ckpt.restore(tiny_state())
  message = str(error.value)
  assert str(tmp_path / '2') in message and 'corrupt' in message
  assert 'resume_step=K' in message and '[1]' in message
  # The documented fallback: the earlier step restores; nothing was touched.
  restored, extra = ckpt.restore(tiny_state(), step=1)
  assert_trees_equal(restored.params, tiny_state(offset=1).params)
  assert extra['pos'] == 10
  ckpt.close()
  assert snapshot(tmp_path) == before


def test_programs_drop_only_the_closed_loop_echoes(capsys, monkeypatch):
  # What TensorStore reports for each read or write still in flight after
  # Orbax raised on the first failure and closed its loop (echoes.py).
  monkeypatch.setattr(sys, 'unraisablehook', sys.__unraisablehook__)
  echoes.quiet_closed_loop_echoes()
  echoes.quiet_closed_loop_echoes()  # Idempotent.
  loop = asyncio.new_event_loop()
  loop.close()

  class Echo:  # Python reports an error in __del__ as unraisable.
    def __del__(self):
      loop.call_soon_threadsafe(print)

  class Other:
    def __del__(self):
      loop.call_soon(print)

  Echo(), Other()  # pylint: disable=expression-not-assigned
  printed = capsys.readouterr().err
  assert 'Other.__del__' in printed and 'Echo' not in printed, printed


def test_garbage_metadata_is_a_clear_error(tmp_path):
  save_steps(tmp_path, [1]).close()
  with open(tmp_path / '1' / 'state' / '_METADATA', 'wb') as f:
    f.write(b'\x00garbage{')
  ckpt = checkpoints.Checkpointer(tmp_path, keep=3, keep_best=False)
  with pytest.raises(CheckpointError, match=f'{tmp_path / "1"}.*cannot be read'):
    ckpt.restore(tiny_state())


def test_swapped_array_files_are_detected(tmp_path):
  # Files that TensorStore reads without complaint but hold another step's
  # values: caught by the per-leaf checksums stored at save time.
  save_steps(tmp_path, [1, 2]).close()
  shutil.rmtree(tmp_path / '2' / 'state')
  shutil.copytree(tmp_path / '1' / 'state', tmp_path / '2' / 'state')
  ckpt = checkpoints.Checkpointer(tmp_path, keep=3, keep_best=False)
  with pytest.raises(CheckpointError, match=r'/2 is corrupt.*params/'):
    ckpt.restore(tiny_state())


def _flip_bit(path, offset, bit):
  with open(path, 'r+b') as f:
    f.seek(offset)
    byte = f.read(1)[0]
    f.seek(offset)
    f.write(bytes([byte ^ (1 << bit)]))


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_every_bit_flip_is_detected_or_harmless(tmp_path):
  # Bit rot: one bit flipped at random offsets in every array file. Each
  # flip must either raise CheckpointError or restore exactly the saved
  # values (a flip in a file or byte the restore does not use).
  save_steps(tmp_path, [1]).close()
  expected = tiny_state(offset=1)
  files = sorted(f for f in glob.glob(str(tmp_path / '1/state/**/d/*'),
                                      recursive=True) if os.path.isfile(f))
  assert len(files) >= 5, files
  rng = np.random.default_rng(0)
  outcomes = {'unchanged': 0, 'checksum': 0, 'unreadable': 0}
  for path in files:
    for _ in range(8):
      offset = int(rng.integers(os.path.getsize(path)))
      bit = int(rng.integers(8))
      _flip_bit(path, offset, bit)
      try:
        ckpt = checkpoints.Checkpointer(tmp_path, keep=3, keep_best=False)
        restored, _ = ckpt.restore(tiny_state())
      except CheckpointError as e:
        assert str(tmp_path / '1') in str(e), e
        outcomes['checksum' if 'checksum mismatch' in str(e)
                 else 'unreadable'] += 1
      else:
        assert_trees_equal(restored, expected)  # Provably unchanged.
        outcomes['unchanged'] += 1
      finally:
        _flip_bit(path, offset, bit)  # Undo: the next flip starts clean.
  # Decoding succeeded with other values, and the checksum caught it.
  assert outcomes['checksum'] > 0 and outcomes['unreadable'] > 0, outcomes
  restored, _ = checkpoints.Checkpointer(
      tmp_path, keep=3, keep_best=False).restore(tiny_state())
  assert_trees_equal(restored, expected)


def test_one_changed_value_changes_the_checksum():
  # The guarantee behind the test above: any change confined to one value,
  # even the lowest bit, or swapping two values, changes the leaf checksum.
  x = np.linspace(-1, 1, 1000, dtype=np.float32).reshape(10, 100)
  base = checks.state_digests({'x': x})['x'][0]
  for index in [(0, 0), (3, 7), (9, 99)]:
    for bit in (0, 17, 31):
      y = x.copy()
      y.view(np.uint32)[index] ^= np.uint32(1 << bit)
      assert checks.state_digests({'x': y})['x'][0] != base, (index, bit)
  swapped = x.copy()
  swapped[0, 0], swapped[0, 1] = x[0, 1], x[0, 0]
  assert checks.state_digests({'x': swapped})['x'][0] != base
  assert checks.state_digests({'x': x.copy()})['x'][0] == base
  # Other dtypes are covered bit for bit too.
  for dtype in (jnp.bfloat16, jnp.int32, jnp.uint8):
    z = jnp.arange(64).astype(dtype)
    assert (checks.state_digests({'z': z})['z'][0] !=
            checks.state_digests({'z': z.at[5].add(1)})['z'][0])


def test_other_variant_names_leaf_and_shapes(tmp_path):
  save_steps(tmp_path, [1, 2]).close()
  ckpt = checkpoints.Checkpointer(tmp_path, keep=3, keep_best=False)
  with pytest.raises(CheckpointError) as error:
    ckpt.restore(tiny_state(hidden_dim=48))
  message = str(error.value)
  assert str(tmp_path / '2') in message, message
  assert ('params/MixerBlock_0/channel_mixing/Dense_0/kernel: checkpoint '
          '(32, 64) float32, this run (48, 64) float32') in message, message


def test_fingerprint_mismatch(tmp_path):
  save_steps(tmp_path, [3], fingerprint={'variant': 'S_4',
                                         'gelu_approximate': True}).close()
  ckpt = checkpoints.Checkpointer(
      tmp_path, keep=3, keep_best=False,
      fingerprint={'variant': 'S_4', 'gelu_approximate': False})
  with pytest.raises(CheckpointError,
                     match='gelu_approximate: checkpoint True, this run False'):
    ckpt.restore(tiny_state())


def test_set_aside_later_steps(tmp_path):
  ckpt = save_steps(tmp_path / 'ck', [1, 2, 3])
  kept = snapshot(tmp_path / 'ck' / '3')
  ckpt.set_aside_steps_after(1)
  assert sorted(os.listdir(tmp_path / 'ck.set_aside')) == ['2', '3']
  assert ckpt.all_steps() == [1]
  assert snapshot(tmp_path / 'ck.set_aside' / '3') == kept  # Not deleted.
  assert ckpt.save(2, tiny_state(offset=20))  # The resumed run saves again.
  ckpt.close()


def test_non_finite_state_is_not_saved(tmp_path):
  ckpt = save_steps(tmp_path, [1])
  bad = tiny_state(offset=2)
  bad = bad.replace(params={**bad.params, 'head': {
      'kernel': bad.params['head']['kernel'].at[0, 0].set(jnp.nan),
      'bias': bad.params['head']['bias']}})
  with pytest.raises(CheckpointError, match='step 2.*params/head/kernel.*'
                     'last good checkpoint is step 1'):
    ckpt.save(2, bad)
  assert ckpt.all_steps() == [1]
  ckpt.close()


def test_non_finite_values_in_a_checkpoint_are_refused_at_load(tmp_path):
  # Written by another program (plain Orbax, no checksums): the NaN in
  # the head is refused at restore, naming the leaf.
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  bad = tiny_state(offset=1)
  bad = bad.replace(params={**bad.params, 'head': {
      'kernel': bad.params['head']['kernel'].at[0, 0].set(jnp.inf),
      'bias': bad.params['head']['bias']}})
  with ocp.CheckpointManager(tmp_path, item_names=('state', 'extra')) as m:
    m.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(bad),
                                      extra=ocp.args.JsonSave({'step': 1})))
  ckpt = checkpoints.Checkpointer(tmp_path, keep=3, keep_best=False)
  with pytest.raises(CheckpointError, match=r'/1 holds NaN or infinite '
                     r'values in params/head/kernel;'):
    ckpt.restore(tiny_state())
  with pytest.raises(CheckpointError, match='params/head/kernel'):
    ckpt.restore_params(tiny_state().params)
  ckpt.close()


def test_unwritable_directory_fails_in_init(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  with pytest.raises(CheckpointError, match='a_file/ck is not writable'):
    checkpoints.Checkpointer(blocker / 'ck', keep=1, keep_best=False)
  if os.geteuid() == 0:  # Root ignores permissions: use a read-only mount.
    ro = tmp_path / 'ro'
    ro.mkdir()
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'ro,size=64k', 'tmpfs',
                       str(ro)], capture_output=True).returncode:
      return
    try:
      with pytest.raises(CheckpointError, match='not writable'):
        checkpoints.Checkpointer(ro, keep=1, keep_best=False)
    finally:
      subprocess.run(['umount', str(ro)], check=True)
  else:
    ro = tmp_path / 'ro'
    ro.mkdir(mode=0o555)
    with pytest.raises(CheckpointError, match='not writable'):
      checkpoints.Checkpointer(ro, keep=1, keep_best=False)


def test_sigterm_and_sigint_request_a_save(tmp_path):
  ckpt = checkpoints.Checkpointer(tmp_path, keep=1, keep_best=False)
  before = signal.getsignal(signal.SIGTERM)
  try:
    assert not ckpt.reached_preemption(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert ckpt.reached_preemption(2)
    assert ckpt.preemption_signal == 'SIGTERM'
  finally:
    ckpt.close()
  assert signal.getsignal(signal.SIGTERM) is before
  # Python's own SIGINT handler, not the one tests/conftest.py gives workers.
  runners = signal.signal(signal.SIGINT, signal.default_int_handler)
  ckpt = checkpoints.Checkpointer(tmp_path, keep=1, keep_best=False)
  try:
    assert not ckpt.reached_preemption(1)
    os.kill(os.getpid(), signal.SIGINT)  # No KeyboardInterrupt: a request.
    assert ckpt.reached_preemption(2) and ckpt.preemption_signal == 'SIGINT'
    with pytest.raises(KeyboardInterrupt):  # A second one stops at once.
      os.kill(os.getpid(), signal.SIGINT)
  finally:
    ckpt.close()
    signal.signal(signal.SIGINT, runners)


def test_restore_never_unpickles(tmp_path, monkeypatch):
  save_steps(tmp_path, [1]).close()

  def refuse(*args, **kwargs):
    raise AssertionError('pickle used while restoring a checkpoint')

  monkeypatch.setattr(pickle, 'load', refuse)
  monkeypatch.setattr(pickle, 'loads', refuse)
  monkeypatch.setattr(pickle, 'Unpickler', refuse)
  monkeypatch.setattr(np, 'load', refuse)
  ckpt = checkpoints.Checkpointer(tmp_path, keep=1, keep_best=False)
  restored, _ = ckpt.restore(tiny_state())
  assert int(restored.step) == 1
  ckpt.close()


def test_reader_of_a_running_job_follows_retention(tmp_path):
  # A read-only reader (evaluate, predict) opened on a running job; the job
  # then saves a step and its retention (keep=1) deletes the one the reader
  # knows as the latest.
  params = lambda v: {'params': {'w': np.full((3,), v, np.float32)}}
  writer = checkpoints.Checkpointer(tmp_path, keep=1, keep_best=False,
                                    async_save=False)
  writer.save(1, params(1.0))
  reader = checkpoints.Checkpointer(tmp_path, keep=1, keep_best=False,
                                    read_only=True)
  assert reader.latest_step() == 1
  writer.save(2, params(2.0))
  assert not (tmp_path / '1').exists()
  restored, extra = reader.restore_params({'w': np.zeros(3, np.float32)})
  assert extra['step'] == 2
  np.testing.assert_array_equal(restored['w'], 2.0)
  writer.save(3, params(3.0))  # Also for the whole state.
  state, extra = reader.restore(params(0.0))
  assert extra['step'] == 3
  np.testing.assert_array_equal(state['params']['w'], 3.0)
  # An explicit step is never swapped for another one.
  writer.save(4, params(4.0))
  with pytest.raises(CheckpointError, match='/3'):
    reader.restore_params({'w': np.zeros(3, np.float32)}, step=3)
  writer.close()
  reader.close()


def test_damaged_latest_is_not_retried_as_another_step(tmp_path):
  ckpt = save_steps(tmp_path, [1, 2])
  ckpt.close()
  for path in glob.glob(str(tmp_path / '2' / 'extra' / '*')):
    with open(path, 'w') as f:
      f.write('not json')
  reader = checkpoints.Checkpointer(tmp_path, keep=3, keep_best=False,
                                    read_only=True)
  with pytest.raises(CheckpointError, match=f'{tmp_path}/2 cannot be read'):
    reader.restore(tiny_state())  # Step 2 exists: its error, no fallback.
  reader.close()


@pytest.mark.parametrize('damage', [b'{"eval_accuracy": 0.9', b'\xff\n', b''])
def test_a_damaged_metrics_file_disables_nothing(tmp_path, damage):
  # Orbax's <step>/metrics/metrics only ranks steps for keep_best.
  ckpt = checkpoints.Checkpointer(tmp_path, keep=3, keep_best=True,
                                  async_save=False)
  for step, accuracy in [(1, 0.9), (2, 0.5), (3, 0.4)]:
    ckpt.save(step, tiny_state(offset=step),
              metrics={'eval_accuracy': accuracy})
  ckpt.close()
  metrics = tmp_path / '1' / 'metrics' / 'metrics'
  metrics.write_bytes(damage)
  before = snapshot(tmp_path)
  # Readers (evaluate, predict, --step=K) never read it: every step works,
  # and nothing is changed.
  reader = checkpoints.Checkpointer(tmp_path, keep=3, keep_best=False,
                                    read_only=True)
  assert reader.all_steps() == [1, 2, 3]
  for step in (1, 3):
    restored, _ = reader.restore(tiny_state(), step=step)
    assert int(restored.step) == step
  reader.close()
  assert snapshot(tmp_path) == before
  # A writer (train, resume_step) refuses, naming the file, and changes
  # nothing; without the file, step 1 no longer counts as the best.
  with pytest.raises(CheckpointError, match=re.escape(
      f"Damaged metrics files: ['{metrics}']; they only rank steps for "
      'keep_best: delete them to go on. Nothing was changed.')):
    checkpoints.Checkpointer(tmp_path, keep=3, keep_best=True)
  assert snapshot(tmp_path) == before
  metrics.unlink()
  writer = checkpoints.Checkpointer(tmp_path, keep=3, keep_best=True,
                                    async_save=False)
  restored, _ = writer.restore(tiny_state(), step=1)
  assert int(restored.step) == 1
  writer.save(4, tiny_state(offset=4), metrics={'eval_accuracy': 0.1})
  assert writer.all_steps() == [2, 3, 4]
  writer.close()


def test_a_step_deleted_while_read_is_not_called_corrupt(tmp_path):
  # `evaluate --step=1` racing a job whose retention deletes step 1.
  save_steps(tmp_path, [1, 2]).close()
  reader = checkpoints.Checkpointer(tmp_path, keep=3, keep_best=False,
                                    read_only=True)
  assert reader.all_steps() == [1, 2]
  shutil.rmtree(tmp_path / '1')  # The job's keep_checkpoints.
  with pytest.raises(CheckpointError, match='was deleted while it was being '
                     r'read .*\[2\]') as error:
    reader.restore(tiny_state(), step=1)
  assert 'corrupt' not in str(error.value)
  reader.close()


def test_a_step_that_is_a_link_loop_is_skipped_with_a_note(tmp_path, caplog):
  save_steps(tmp_path, [1, 2]).close()
  shutil.rmtree(tmp_path / '2')
  os.symlink('2', tmp_path / '2')  # The step folder replaced by a loop.
  before = snapshot(tmp_path)
  ckpt = checkpoints.Checkpointer(tmp_path, keep=3, keep_best=False,
                                  read_only=True)
  assert ckpt.all_steps() == [1]
  ckpt.close()
  assert (f'{tmp_path / "2"} is a symbolic link that cannot be followed: '
          'step 2 is skipped.') in caplog.text
  # Training would go on from step 1 past it, or save a new step 2 beside
  # it: refused, naming it.
  with pytest.raises(CheckpointError, match=re.escape(
      f'{tmp_path / "2"} is a symbolic link that cannot be followed: step 2 '
      'cannot be read.')):
    checkpoints.Checkpointer(tmp_path, keep=3, keep_best=False)
  assert snapshot(tmp_path) == before and os.path.islink(tmp_path / '2')


@pytest.mark.parametrize('target', ['checkpoints', 'gone'])
def test_a_checkpoint_directory_link_that_leads_nowhere(tmp_path, target):
  directory = tmp_path / 'checkpoints'
  os.symlink(target, directory)
  expected = ({'checkpoints': f'a symbolic link loop ({directory} -> '
                              'checkpoints)',
               'gone': 'a symbolic link to gone, which does not exist'}
              [target])
  for read_only in (True, False):
    with pytest.raises(CheckpointError) as error:
      checkpoints.Checkpointer(directory, keep=3, keep_best=False,
                               read_only=read_only)
    assert str(error.value) == (
        f'Checkpoint directory {directory} is {expected}; fix or remove the '
        'link. Nothing was changed.')
  assert os.listdir(tmp_path) == ['checkpoints']
  assert os.readlink(directory) == target
