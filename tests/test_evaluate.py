"""Tests for mixer_jax.evaluate on the built-in digits data (no download).

A small Mixer with random (non-trivial) parameters is saved as a training
run would save it, then evaluated through every kind of --checkpoint; the
expected top-1, top-5 and loss are computed here independently, with numpy
over the unsharded eval data.
"""

import functools
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from configs import quickstart
from mixer_jax import model_from_config
from mixer_jax.checkpointing import checkpoint_checks
from mixer_jax.checkpointing import checkpoints
from mixer_jax.checkpointing import fingerprint
from mixer_jax.data import input_pipeline
from mixer_jax import evaluate
from mixer_jax.training import train_steps
from mixer_jax.weights import pretrained
from mixer_jax.weights import run_info

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config():
  config = quickstart.get_config()
  config.model.num_blocks = 2
  config.model.hidden_dim = 32
  config.batch_size = 32  # 144 held-out images: the last batch is padded.
  return config


@functools.lru_cache(maxsize=None)
def trained_state():
  """A TrainState whose parameters are random, so predictions vary."""
  config = small_config()
  model = model_from_config.create_model(config, 10)
  state = jax.jit(functools.partial(
      train_steps.create_train_state, model, optax.adam(1e-3),
      image_size=config.image_size))(jax.random.PRNGKey(0))
  leaves, tree = jax.tree.flatten(state.params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  leaves = [x + 0.3 * jax.random.normal(k, x.shape)
            for x, k in zip(leaves, keys)]
  return model, state.replace(params=jax.tree.unflatten(tree, leaves))


def expected_metrics(config, model, params):
  """Top-1/top-5/loss over the eval split, numpy, no sharding or jit."""
  images, labels = [], []
  for batch in input_pipeline.eval_dataset(
      config, process_index=0, process_count=1).as_numpy_iterator():
    keep = batch['mask'] > 0
    images.append(batch['image'][keep])
    labels.append(batch['label'][keep])
  images, labels = np.concatenate(images), np.concatenate(labels)
  logits = np.asarray(model.apply({'params': params}, images))
  target = labels.argmax(-1)
  ranked = np.argsort(-logits, axis=-1)
  loss = np.asarray(optax.softmax_cross_entropy(logits, labels))
  return {'top1': np.mean(ranked[:, 0] == target),
          'top5': np.mean((ranked[:, :5] == target[:, None]).any(-1)),
          'loss': loss.mean(), 'examples': len(target)}


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  config = small_config()
  model, state = trained_state()
  workdir = tmp_path_factory.mktemp('run')
  ckpt = checkpoints.Checkpointer(
      workdir / 'checkpoints', keep=3, keep_best=False,
      fingerprint=fingerprint.model_fingerprint(config, 10))
  ckpt.save(100, state.replace(step=np.int32(100)))
  ckpt.save(200, state.replace(step=np.int32(200)))
  ckpt.close()
  run_info.save_run_info(str(workdir), config, 10)  # As train writes it.
  return workdir


def assert_matches(result, expected):
  assert result['examples'] == expected['examples'] == 144
  for key in ('top1', 'top5', 'loss'):
    np.testing.assert_allclose(result[key], expected[key], rtol=1e-5,
                               err_msg=key)


def test_workdir_step_dir_and_step_flag(workdir):
  config = small_config()
  model, state = trained_state()
  expected = expected_metrics(config, model, state.params)
  assert 0.0 < expected['top1'] < expected['top5'] < 1.0  # Non-trivial.
  result = evaluate.evaluate(config, str(workdir))
  assert result['checkpoint'] == f'{workdir} step 200'
  assert_matches(result, expected)
  result = evaluate.evaluate(config, str(workdir / 'checkpoints' / '200'))
  assert_matches(result, expected)
  result = evaluate.evaluate(config, str(workdir / 'checkpoints'), step=200)
  assert_matches(result, expected)


def test_official_npz(workdir, tmp_path):
  config = small_config()
  model, state = trained_state()
  path = str(tmp_path / 'mixer.npz')
  pretrained.export_official(jax.device_get(state.params), path)
  result = evaluate.evaluate(config, path)
  assert_matches(result, expected_metrics(config, model, state.params))


def test_npz_with_other_head_is_rejected(tmp_path):
  config = small_config()
  other = small_config()
  model = model_from_config.create_model(other, 7)
  params = jax.jit(model.init)(jax.random.PRNGKey(0),
                               np.zeros((1, 8, 8, 3)))['params']
  path = str(tmp_path / 'seven.npz')
  pretrained.export_official(jax.device_get(params), path)
  with pytest.raises(ValueError, match='7-class head but digits has 10'):
    evaluate.evaluate(config, path)


def test_checkpoint_of_another_config_is_a_clear_error(workdir):
  config = small_config()
  config.model.hidden_dim = 48
  with pytest.raises(checkpoint_checks.CheckpointError,
                     match=r'checkpoints/200 .*hidden_dim: checkpoint 32, '
                     'this run 48'):
    evaluate.evaluate(config, str(workdir))
  config = small_config()
  with pytest.raises(checkpoint_checks.CheckpointError, match=r'Step 7 is not in'):
    evaluate.evaluate(config, str(workdir), step=7)


def test_evaluating_writes_nothing_and_shows_progress(workdir, capsys):
  before = sorted(p for p in workdir.rglob('*'))
  evaluate.evaluate(small_config(), str(workdir), step=100,
                    progress_every_s=0)
  assert sorted(p for p in workdir.rglob('*')) == before
  assert 'eval: batch 5/~5' in capsys.readouterr().out  # 144 / 32.


def test_command_line(workdir, tmp_path):
  output = tmp_path / 'result.json'
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  run = subprocess.run(
      [sys.executable, '-m', 'mixer_jax.evaluate',
       '--config=configs/quickstart.py', f'--checkpoint={workdir}',
       '--config.model.num_blocks=2', '--config.model.hidden_dim=32',
       '--config.batch_size=32', f'--output={output}'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'top-1' in run.stdout and '144 examples' in run.stdout
  assert output.exists()


def test_command_line_overrides_the_workdirs_config(workdir):
  # No --config: --config.FIELD overrides apply to the run's saved config.
  config = small_config()
  config.eval_split = 'test'
  model, state = trained_state()
  expected = expected_metrics(config, model, state.params)
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  run = subprocess.run(
      [sys.executable, '-m', 'mixer_jax.evaluate', f'--checkpoint={workdir}',
       '--config.eval_split=test'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert (f'on test: top-1 {expected["top1"]:.4f}' in run.stdout
          and f'({expected["examples"]} examples' in run.stdout), run.stdout
  run = subprocess.run(
      [sys.executable, '-m', 'mixer_jax.evaluate', f'--checkpoint={workdir}',
       '--config.eval_splt=test'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 1
  assert run.stderr.strip() == (
      'ConfigError: unknown config field \'eval_splt\'; Did you mean '
      '"eval_split" instead of "eval_splt"?'), run.stderr


def test_nan_logits_are_scored_as_argmax_and_counted_in_the_line(tmp_path):
  # Finite weights whose logits are NaN: a pre-head LayerNorm scale of 3e38
  # makes features of both signs overflow to +-inf, and the head's sums
  # inf - inf. Every class of every row is NaN, so argmax picks class 0
  # and the top-5 are classes 0-4: top-1 is the share of label 0.
  config = small_config()
  _, state = trained_state()
  params = jax.tree.map(np.asarray, jax.device_get(state.params))
  params['pre_head_layer_norm']['scale'] = np.full_like(
      params['pre_head_layer_norm']['scale'], 3e38)
  path = str(tmp_path / 'overflowing.npz')
  pretrained.export_official(params, path)
  labels = np.concatenate([
      b['label'][b['mask'] > 0].argmax(-1) for b in input_pipeline.eval_dataset(
          config, process_index=0, process_count=1).as_numpy_iterator()])
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  run = subprocess.run(
      [sys.executable, '-m', 'mixer_jax.evaluate',
       '--config=configs/quickstart.py', f'--checkpoint={path}',
       '--config.model.num_blocks=2', '--config.model.hidden_dim=32',
       '--config.batch_size=32'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert (f'top-1 {np.mean(labels == 0):.4f}, top-5 '
          f'{np.mean(labels < 5):.4f}, loss nan (144 examples') in run.stdout
  assert run.stdout.rstrip().endswith(
      '; 144 examples with NaN logits (scored as argmax does: the first NaN '
      'class)'), run.stdout
