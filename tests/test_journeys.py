"""Journeys run whole on 8 fake devices: the ImageNet recipe in miniature.

`configs/mixer_i1k.py` with a tiny model under `tfds.testing.mock_data`
trains through its main eval and every kind of `config.evals` entry
(classification, ReaL, few-shot), saves checkpoints, takes a SIGTERM in the
middle of its periodic evaluations and resumes: it ends with the same
parameters and metrics as an uninterrupted run. Under `replicate` it scores
what it scores under `fsdp`.
"""

import os
import signal

import jax
import numpy as np
import mock_tfds
import pytest
import tensorflow_datasets as tfds

from configs import mixer_i1k
from mixer_jax.training import evals
from mixer_jax.training import reporting
from mixer_jax.training import trainer
import run_state

COMPARED = ('accuracy', 'loss', 'top5', 'examples')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds'))
  for name, splits in (('imagenet2012', ['train', 'validation']),
                       ('imagenet_v2', ['test']),
                       ('imagenet2012_real', ['validation']),
                       ('cifar100', ['train', 'test'])):
    mock_tfds.write_split_sizes(name, path, splits, 16)
  return path


def recipe(data_dir, strategy):
  """mixer_i1k.py:S_32 with its pipeline, losses and evals, made tiny."""
  config = mixer_i1k.get_config('S_32')
  config.data_dir, config.sharding = data_dir, strategy
  config.fsdp_min_size_mb = 0.0  # Split even this tiny model's arrays.
  m = config.model
  m.num_blocks, m.hidden_dim, m.tokens_mlp_dim, m.channels_mlp_dim = (
      1, 16, 8, 16)
  m.dtype = 'float32'
  config.image_size, config.pp.eval_resize = 32, 36
  config.batch_size, config.num_train_steps, config.warmup_steps = 16, 2, 1
  config.shuffle_buffer = 64
  config.log_every_steps = 1
  # Saved at the last step only (and on a stop request): mock_data swaps
  # the file system while a data set is opened, which would catch an
  # asynchronous save still writing the step before.
  config.eval_every_steps = config.checkpoint_every_steps = 2
  for entry in config.evals.values():
    entry.every_steps = 1
    entry.resize = 36 if entry.resize else 0
  config.evals.fewshot.fewshot_datasets = {
      'cifar100': ('cifar100', 'train', 'test')}
  config.evals.fewshot.shots = (1, 2)
  return config


def _metrics(workdir):
  """{(step, name): value} of every score (no speeds or times)."""
  return {(r['step'], k): v for r in reporting.read_metrics(workdir)
          for k, v in r.items() if any(c in k for c in COMPARED)}


def _params(workdir, config):
  state, _ = run_state.load_train_state(config, workdir)
  return jax.tree.map(np.asarray, state.params)


def _run(config, workdir):
  with tfds.testing.mock_data(num_examples=16, data_dir=config.data_dir):
    return trainer.train_and_evaluate(config, workdir)


@pytest.fixture(scope='module')
def uninterrupted(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('fsdp'))
  config = recipe(data_dir, 'fsdp')
  summary = _run(config, workdir)
  with tfds.testing.mock_data(num_examples=16, data_dir=data_dir):
    params = _params(workdir, config)
  return summary, _metrics(workdir), params


def test_recipe_runs_every_eval_kind_under_fsdp(uninterrupted):
  summary, metrics, _ = uninterrupted
  assert summary['steps'] == 2 and not summary['preempted']
  names = {name for _, name in metrics}
  for entry in ('minival', 'val', 'v2'):
    assert {f'{entry}/accuracy', f'{entry}/top5', f'{entry}/loss'} <= names
  assert {'real/accuracy', 'fewshot/cifar100_2shot_accuracy',
          'eval_accuracy', 'train_loss'} <= names
  for step in (1, 2):  # Every entry at both steps (every_steps=1).
    assert metrics[(step, 'val/examples')] == 16  # The whole split, once.
  # The main eval and the minival entry score the same split and model.
  assert metrics[(2, 'minival/accuracy')] == pytest.approx(
      metrics[(2, 'eval_accuracy')])


def test_sigterm_during_evaluations_saves_then_resumes_exactly(
    uninterrupted, data_dir, tmp_path, monkeypatch):
  config = recipe(data_dir, 'fsdp')
  workdir = str(tmp_path / 'run')
  original = evals.Evaluations.run_one
  calls = []

  def sigterm_on_second_entry(self, name, params):
    calls.append(name)
    if len(calls) == 2:  # Mid-way through step 1's config.evals.
      os.kill(os.getpid(), signal.SIGTERM)
    return original(self, name, params)

  monkeypatch.setattr(evals.Evaluations, 'run_one', sigterm_on_second_entry)
  stopped = _run(config, workdir)
  monkeypatch.undo()
  # Saved first: step 1 is checkpointed with the evaluations left to do.
  assert stopped['preempted'] and stopped['steps'] == 1
  assert stopped['last_checkpoint_step'] == 1
  done_before = {name for _, name in _metrics(workdir)}
  assert not any(n.startswith(calls[1] + '/') for n in done_before)
  resumed = _run(config, workdir)  # The same command again.
  assert resumed['steps'] == 2 and not resumed['preempted']
  summary, metrics, params = uninterrupted
  got = _metrics(workdir)
  assert got.keys() == metrics.keys()
  for key in metrics:
    assert got[key] == pytest.approx(metrics[key], rel=1e-5, abs=1e-6), key
  with tfds.testing.mock_data(num_examples=16, data_dir=data_dir):
    got_params = _params(workdir, config)
  for a, b in zip(jax.tree.leaves(got_params), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert resumed['last_eval_accuracy'] == summary['last_eval_accuracy']


@pytest.mark.slow  # Also covered: tests/test_fewshot.py (8 fsdp against 1).
def test_replicated_recipe_scores_as_fsdp(uninterrupted, data_dir, tmp_path):
  config = recipe(data_dir, 'replicate')
  _run(config, str(tmp_path / 'run'))
  got, want = _metrics(str(tmp_path / 'run')), uninterrupted[1]
  assert got.keys() == want.keys()
  for key in want:
    assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), key
