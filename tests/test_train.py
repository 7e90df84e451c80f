"""End-to-end tests of train_and_evaluate on the built-in digits data."""

import copy
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from configs import quickstart
from mixer_jax import model_from_config
from mixer_jax import models
from mixer_jax.checkpointing import checkpoint_checks
from mixer_jax.checkpointing import checkpoints
from mixer_jax.training import config_validation
from mixer_jax.training import errors
from mixer_jax.training import reporting
from mixer_jax.training import trainer
from mixer_jax.weights import pretrained
import run_state


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def small_config(data_dir, **overrides):
  """Quick-start data and recipe with a smaller model and fewer steps."""
  config = quickstart.get_config()
  config.data_dir = data_dir
  config.model.num_blocks, config.model.hidden_dim = 2, 32
  config.model.tokens_mlp_dim, config.model.channels_mlp_dim = 16, 64
  config.num_train_steps, config.warmup_steps = 20, 2
  config.log_every_steps, config.eval_every_steps = 2, 100
  config.checkpoint_every_steps, config.keep_checkpoints = 100, 5
  config.update(overrides)
  return config


def params_of(config, workdir, step=None):
  state, extra = run_state.load_train_state(config, str(workdir), step)
  return jax.device_get(state.params), extra


def assert_params_equal(a, b):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0],
                          jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7, err_msg=str(path))


def test_shortened_quickstart_learns(data_dir, tmp_path):
  config = quickstart.get_config()
  config.data_dir = data_dir
  config.num_train_steps, config.warmup_steps = 100, 10
  config.log_every_steps, config.eval_every_steps = 25, 50
  config.checkpoint_every_steps = 50
  with run_state.compilations() as compiled:
    summary = trainer.train_and_evaluate(config, str(tmp_path))
  assert summary['steps'] == 100 and not summary['preempted']
  assert summary['last_eval_accuracy'] > 0.8  # Chance is 0.1.
  assert compiled.count('jit(train_step)') == 1
  assert summary['last_checkpoint_step'] == 100
  records = reporting.read_metrics(str(tmp_path))
  train_steps = [r['step'] for r in records if 'train_loss' in r]
  eval_steps = [r['step'] for r in records if 'eval_accuracy' in r]
  assert train_steps == [25, 50, 75, 100] and eval_steps == [50, 100]
  first, last = records[0], [r for r in records if 'train_loss' in r][-1]
  assert last['train_loss'] < first['train_loss']
  assert first['images_per_sec'] > 0 and 'train_learning_rate' in first
  # What bounds the run: model FLOP/s per device (3 forward passes an image),
  # the share of time spent waiting for input, no MFU on a CPU (no peak).
  assert first['tflops_per_device'] == pytest.approx(
      first['images_per_sec'] * 3 * models.flops_per_image(
          models.create_model('S_2', 10, num_blocks=4, hidden_dim=64,
                              tokens_mlp_dim=32, channels_mlp_dim=128), 8)
      / jax.device_count() / 1e12)
  assert 0 <= first['input_wait_share'] <= 1 and 'mfu' not in first
  assert summary['images_per_sec'] > 0 and 'input_wait_share' in summary
  final_eval = [r for r in records if r['step'] == 100 and
                'eval_accuracy' in r][0]
  assert final_eval['eval_examples'] == 144  # Every held-out image, once.
  assert final_eval['eval_accuracy'] == summary['last_eval_accuracy']
  # The best is the highest of the evaluations the run wrote down.
  assert summary['best_eval_accuracy'] == max(
      r['eval_accuracy'] for r in records if 'eval_accuracy' in r)
  events = [f for f in os.listdir(tmp_path) if 'tfevents' in f]
  assert events, os.listdir(tmp_path)
  assert {'50', '100'} <= set(os.listdir(tmp_path / 'checkpoints'))


@pytest.fixture(scope='module')
def reference(data_dir, tmp_path_factory):
  """An uninterrupted 12-step run saving steps 4, 8 and 12."""
  config = small_config(data_dir, num_train_steps=12,
                        checkpoint_every_steps=4)
  workdir = tmp_path_factory.mktemp('reference')
  summary = trainer.train_and_evaluate(config, str(workdir))
  assert summary['steps'] == 12 and summary['last_checkpoint_step'] == 12
  params, _ = params_of(config, workdir)
  return config, workdir, summary, params


def test_preemption_then_restart_equals_uninterrupted(reference, tmp_path):
  config, _, ref_summary, ref_params = reference
  workdir = tmp_path / 'preempted'
  metrics_file = workdir / reporting.METRICS_FILE

  def send_sigterm_after_first_log():
    deadline = time.time() + 300
    while time.time() < deadline:
      if metrics_file.exists() and 'train_loss' in metrics_file.read_text():
        os.kill(os.getpid(), signal.SIGTERM)
        return
      time.sleep(0.01)

  killer = threading.Thread(target=send_sigterm_after_first_log, daemon=True)
  killer.start()
  first = trainer.train_and_evaluate(config, str(workdir))
  killer.join()
  assert first['preempted'], first
  stopped = first['steps']
  assert 2 <= stopped < 12 and first['last_checkpoint_step'] == stopped
  # The handler is released after the run.
  assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None)

  with run_state.compilations() as compiled:
    second = trainer.train_and_evaluate(config, str(workdir))
  assert second['start_step'] == stopped and second['steps'] == 12
  assert not second['preempted']
  assert compiled.count('jit(train_step)') == 1
  resumed_params, extra = params_of(config, workdir)
  assert extra['step'] == 12
  assert_params_equal(ref_params, resumed_params)
  assert second['last_eval_accuracy'] == ref_summary['last_eval_accuracy']


def test_restart_from_an_earlier_step_equals_uninterrupted(reference,
                                                           tmp_path):
  config, ref_workdir, _, ref_params = reference
  workdir = tmp_path / 'run'
  shutil.copytree(ref_workdir, workdir)
  # Fall back to step 4 (as if 8 and 12 were damaged) and train again.
  config = copy.deepcopy(config)
  config.resume_step = 4
  summary = trainer.train_and_evaluate(config, str(workdir))
  assert summary['start_step'] == 4 and summary['steps'] == 12
  again, _ = params_of(config, workdir, step=12)
  assert_params_equal(ref_params, again)
  aside = workdir / 'checkpoints.set_aside'
  assert sorted(os.listdir(aside)) == ['12', '8']  # Moved, not deleted.
  # The same command again (e.g. after a preemption) keeps the progress
  # made since step 4: resume_step applies once.
  again = trainer.train_and_evaluate(config, str(workdir))
  assert again['start_step'] == 12 and again['steps'] == 12
  assert sorted(os.listdir(aside)) == ['12', '8']
  assert '12' in os.listdir(workdir / 'checkpoints')


def test_checkpoint_of_another_model_is_refused(reference, tmp_path):
  config, ref_workdir, _, _ = reference
  workdir = tmp_path / 'run'
  shutil.copytree(ref_workdir, workdir)
  config = copy.deepcopy(config)
  config.model.hidden_dim = 48
  with pytest.raises(checkpoint_checks.CheckpointError, match='hidden_dim'):
    trainer.train_and_evaluate(config, str(workdir))
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['12', '4', '8']


def test_nan_loss_stops_naming_the_step(data_dir, tmp_path):
  config = small_config(data_dir, optimizer='sgd', b1=0.0, learning_rate=1e9,
                        warmup_steps=0, grad_clip_norm=0.0, weight_decay=0.0,
                        end_learning_rate_multiplier=1.0, checkpoint_every_steps=1,
                        log_every_steps=1)
  with pytest.raises(errors.NonFiniteLossError) as info:
    trainer.train_and_evaluate(config, str(tmp_path))
  message = str(info.value)
  bad_step = int(re.search(r'at step (\d+)', message).group(1))
  assert 'was not saved' in message
  saved = sorted(int(s) for s in os.listdir(tmp_path / 'checkpoints')
                 if s.isdigit())
  assert all(s < bad_step for s in saved), (saved, bad_step)
  if saved:
    assert f'checkpoint is step {saved[-1]}' in message
    params, _ = params_of(config, tmp_path)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def test_logged_metrics_are_means_of_the_steps_of_their_interval(
    data_dir, tmp_path):
  # The loop fetches its metrics only at log points; each record must still
  # be the mean over exactly the steps of its interval, here checked
  # against the same run logged at every step.
  every_step = small_config(data_dir, num_train_steps=12, log_every_steps=1)
  every_fourth = small_config(data_dir, num_train_steps=12,
                              log_every_steps=4)
  trainer.train_and_evaluate(every_step, str(tmp_path / 'each'))
  trainer.train_and_evaluate(every_fourth, str(tmp_path / 'fourth'))
  each = {r['step']: r for r in reporting.read_metrics(str(tmp_path / 'each'))
          if 'train_loss' in r}
  fourth = [r for r in reporting.read_metrics(str(tmp_path / 'fourth'))
            if 'train_loss' in r]
  assert sorted(each) == list(range(1, 13))
  assert [r['step'] for r in fourth] == [4, 8, 12]
  for record in fourth:
    steps = range(record['step'] - 3, record['step'] + 1)
    for key in ('train_loss', 'train_accuracy', 'train_grad_norm',
                'train_learning_rate'):
      assert record[key] == pytest.approx(
          np.mean([each[s][key] for s in steps]), rel=1e-5), key


def test_bad_config_fails_before_anything_is_written(data_dir, tmp_path):
  config = small_config(data_dir, batch_size=60)  # 60 % 8 devices != 0.
  with pytest.raises(config_validation.ConfigError, match='batch_size=60'):
    trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_init_from_an_official_npz_replaces_the_head(data_dir, tmp_path):
  config = small_config(data_dir, num_train_steps=2, warmup_steps=1,
                        checkpoint_every_steps=1)
  source_model = model_from_config.create_model(config, 5)  # Another class count.
  source = models.init_params(source_model, jax.random.PRNGKey(7), 8)
  npz = str(tmp_path / 'source.npz')
  pretrained.export_official(source, npz)
  config.init_from = npz
  trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  # The first update uses learning rate 0 (warmup), so step 1 holds the
  # initial parameters: the checkpoint's, with a fresh 10-class zero head.
  params, _ = params_of(config, tmp_path / 'run', step=1)
  assert params['head']['kernel'].shape == (32, 10)
  assert not np.any(params['head']['kernel'])
  np.testing.assert_array_equal(params['stem']['kernel'],
                                source['stem']['kernel'])
  np.testing.assert_array_equal(
      params['MixerBlock_1']['channel_mixing']['Dense_0']['kernel'],
      source['MixerBlock_1']['channel_mixing']['Dense_0']['kernel'])


def test_unwritable_workdir_fails_before_training(data_dir, tmp_path):
  blocker = tmp_path / 'not_a_directory'
  blocker.write_text('a file where the workdir should be')
  config = small_config(data_dir)
  with pytest.raises(checkpoint_checks.CheckpointError, match='not writable'):
    trainer.train_and_evaluate(config, str(blocker / 'run'))


@pytest.mark.slow
def test_command_line_sigterm_saves_and_exits_cleanly(data_dir, tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  command = [sys.executable, '-m', 'mixer_jax.train',
             '--config=configs/quickstart.py', f'--workdir={tmp_path}',
             f'--config.data_dir={data_dir}', '--config.num_train_steps=3000',
             '--config.log_every_steps=10']
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS='cpu')
  process = subprocess.Popen(command, cwd=root, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  output = []
  for line in process.stdout:  # Wait until training runs, then preempt.
    output.append(line)
    if 'step 10/3000' in line:
      process.send_signal(signal.SIGTERM)
      break
  output.append(process.communicate(timeout=300)[0])
  text = ''.join(output)
  assert process.returncode == 0, text[-3000:]
  assert 'Received SIGTERM' in text and re.search(r'preempted +True', text)
  saved = [int(s) for s in os.listdir(tmp_path / 'checkpoints') if s.isdigit()]
  assert len(saved) == 1 and 10 <= saved[0] < 3000


def _export_small(config, path, image_size=8, **sizes):
  """Writes an official-format npz of a small Mixer; returns its params."""
  m = config.model
  sizes = {**dict(num_blocks=m.num_blocks, hidden_dim=m.hidden_dim,
                  tokens_mlp_dim=16, channels_mlp_dim=m.channels_mlp_dim),
           **sizes}
  model = models.create_model(m.variant, 10, **sizes)
  params = models.init_params(model, jax.random.PRNGKey(3), image_size)
  pretrained.export_official(params, path)
  return params


def test_init_from_that_does_not_fit_fails_before_anything_is_written(
    data_dir, tmp_path):
  config = small_config(data_dir)
  config.init_from = str(tmp_path / 'other.npz')
  _export_small(config, config.init_from, hidden_dim=48)
  with pytest.raises(config_validation.ConfigError,
                     match=r'hidden_dim: checkpoint 48, config 32'):
    trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()
  config.init_from = str(tmp_path / 'missing.npz')
  with pytest.raises(FileNotFoundError, match='missing.npz'):
    trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_init_from_at_twice_the_resolution_derives_tokens_mlp_dim(
    data_dir, tmp_path):
  config = small_config(data_dir, num_train_steps=2, warmup_steps=1,
                        checkpoint_every_steps=1, image_size=16)
  config.model.tokens_mlp_dim = None
  config.init_from = str(tmp_path / 'source.npz')
  source = _export_small(config, config.init_from, image_size=8)
  trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  # Step 1 holds the initial parameters (learning rate 0 in warmup).
  params, _ = params_of(config, tmp_path / 'run', step=1)
  expected = pretrained.expand_token_mixing(source, 2)
  for block in ('MixerBlock_0', 'MixerBlock_1'):
    for layer in ('Dense_0', 'Dense_1'):
      got = params[block]['token_mixing'][layer]
      want = expected[block]['token_mixing'][layer]
      assert got['kernel'].shape == want['kernel'].shape
      np.testing.assert_array_equal(got['kernel'], want['kernel'])
      np.testing.assert_array_equal(got['bias'], want['bias'])
  assert params['MixerBlock_0']['token_mixing']['Dense_0']['kernel'].shape == (
      64, 4 * 16)


def test_keep_best_saves_only_improving_evals(data_dir, tmp_path):
  config = small_config(data_dir, num_train_steps=16, eval_every_steps=2,
                        checkpoint_every_steps=100, keep_checkpoints=20,
                        keep_best_checkpoint=True)
  trainer.train_and_evaluate(config, str(tmp_path))
  evals = [(r['step'], r['eval_accuracy'])
           for r in reporting.read_metrics(str(tmp_path))
           if 'eval_accuracy' in r]
  assert [s for s, _ in evals] == list(range(2, 17, 2))
  improving, best = {16}, None
  for step, accuracy in evals:
    if best is None or accuracy > best:
      improving.add(step)
      best = accuracy
  assert len(improving) < len(evals), evals  # Else the test shows nothing.
  saved = {int(s) for s in os.listdir(tmp_path / 'checkpoints')
           if s.isdigit()}
  assert saved == improving, evals


def test_command_line_error_has_no_traceback(data_dir, tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  command = [sys.executable, '-m', 'mixer_jax.train',
             '--config=configs/quickstart.py', f'--workdir={tmp_path}/run',
             f'--config.data_dir={data_dir}',
             '--config.init_from=/nonexistent.npz']
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS='cpu')
  run = subprocess.run(command, cwd=root, env=env, text=True,
                       capture_output=True, timeout=300)
  assert run.returncode != 0
  assert 'CheckpointNotFoundError' in run.stderr, run.stderr[-3000:]
  assert '/nonexistent.npz' in run.stderr
  assert 'Traceback' not in run.stderr, run.stderr[-3000:]
  assert not (tmp_path / 'run').exists()


def test_the_summary_lists_every_eval_and_paths_as_given(data_dir, tmp_path,
                                                         monkeypatch, capsys):
  config = small_config(data_dir, num_train_steps=4, log_every_steps=4,
                        eval_every_steps=4, ema_decay=0.5)
  config.model.num_blocks, config.model.hidden_dim = 1, 16
  monkeypatch.chdir(tmp_path)
  summary = trainer.train_and_evaluate(config, 'run')  # A relative workdir.
  out = capsys.readouterr().out
  printed = {key: re.search(rf'step 4: {line} ([\d.]+)', out).group(1)
             for key, line in (('last_eval_accuracy', 'eval accuracy'),
                               ('ema/eval_accuracy', 'EMA eval accuracy'),
                               ('test/accuracy', 'test/accuracy'))}
  table = dict(re.findall(r'^  (\S+) +(\S+)$',
                          out[out.index('Training summary:'):], re.M))
  # Every eval printed at the last step is in the summary, with its value.
  assert {key: table.get(key) for key in printed} == printed
  assert (table['workdir'], table['checkpoint_dir'], table['metrics_file']) == (
      'run', os.path.join('run', 'checkpoints'),
      os.path.join('run', 'metrics.jsonl'))
  assert os.path.isdir(summary['checkpoint_dir'])
  assert os.path.isfile(summary['metrics_file'])
