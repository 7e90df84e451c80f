"""The weights' EMA through a whole run: saved, resumed, evaluated, served.

The update rule itself is checked by hand in tests/test_train_steps.py (and
8 devices against 1 there); here the journey: a run with config.ema_decay
logs `ema/eval_*`, keeps the EMA in its checkpoints, a resume from an
earlier step continues it exactly, and evaluate, predict and export read it
with `weights='ema'`.
"""

import shutil

import jax
import numpy as np
import pytest
from test_train import assert_params_equal
from test_train import small_config

from mixer_jax import evaluate
from mixer_jax.checkpointing import checkpoint_checks
from mixer_jax.training import reporting
from mixer_jax.training import trainer
from mixer_jax.weights import any_checkpoint
import run_state


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def test_ema_run_saves_resumes_evaluates_and_serves(data_dir, tmp_path):
  config = small_config(data_dir, num_train_steps=6, checkpoint_every_steps=3,
                        eval_every_steps=6, ema_decay=0.7)
  workdir = tmp_path / 'run'
  trainer.train_and_evaluate(config, str(workdir))
  ema_evals = [r for r in reporting.read_metrics(str(workdir))
               if 'ema/eval_accuracy' in r]
  assert [r['step'] for r in ema_evals] == [6]
  state, _ = run_state.load_train_state(config, str(workdir))
  ema = jax.device_get(state.ema_params)
  params = jax.device_get(state.params)
  assert not np.allclose(ema['head']['kernel'], params['head']['kernel'])

  # Resumed from step 3, the EMA continues exactly as in the whole run.
  copy = tmp_path / 'copy'
  shutil.copytree(workdir, copy)
  trainer.train_and_evaluate(
      small_config(data_dir, num_train_steps=6, checkpoint_every_steps=3,
                   eval_every_steps=6, ema_decay=0.7, resume_step=3),
      str(copy))
  resumed, _ = run_state.load_train_state(config, str(copy))
  assert_params_equal(ema, jax.device_get(resumed.ema_params))

  # Served: the EMA weights of the step, scored as the run scored them.
  loaded = any_checkpoint.load(str(workdir), weights='ema')
  for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(ema)):
    np.testing.assert_array_equal(a, b)
  assert loaded.source.endswith('(EMA weights)')
  result = evaluate.evaluate(config, str(workdir), weights='ema')
  assert result['top1'] == pytest.approx(ema_evals[0]['ema/eval_accuracy'])
  assert result['loss'] == pytest.approx(ema_evals[0]['ema/eval_loss'],
                                         rel=1e-5)


def test_weights_ema_of_a_run_without_ema_is_a_clear_error(data_dir,
                                                           tmp_path):
  config = small_config(data_dir, num_train_steps=2, warmup_steps=1)
  trainer.train_and_evaluate(config, str(tmp_path))
  with pytest.raises(checkpoint_checks.CheckpointError,
                     match='without an EMA.*--weights=params'):
    any_checkpoint.load(str(tmp_path), weights='ema')
