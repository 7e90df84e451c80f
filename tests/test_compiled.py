"""Tests of mixer_jax.training.compiled: one set of jitted functions per run.

The crash this guards against: with `sharding='fsdp'` the train and eval
steps took parameters split over the devices while config.evals jitted its
own steps for replicated ones, so a run died at its first config.evals entry
("Sharding passed to jit does not match"). Classification and ReaL
entries now run on fsdp parameters over 2 devices and score exactly what
one device scores with replicated parameters.
"""

import jax
import numpy as np
import pytest

from mixer_jax import config_defaults
from configs import quickstart
from mixer_jax import model_from_config
from mixer_jax.training import compiled
from mixer_jax.training import evals
from mixer_jax.training import optim
from mixer_jax.training import sharding


def _config(data_dir, **overrides):
  config = quickstart.get_config()
  config.model.num_blocks, config.model.hidden_dim = 1, 16
  config.model.tokens_mlp_dim, config.model.channels_mlp_dim = 8, 32
  config.data_dir, config.batch_size = data_dir, 32
  config.fsdp_min_size_mb = 0.0  # Split even this tiny model's arrays.
  config.evals.heldout = config_defaults.eval_entry(split='test')
  # The few-shot kind on fsdp parameters: tests/test_fewshot.py (ImageNet
  # recipe, 8 devices against 1) and tests/test_journeys.py.
  config.evals.real = config_defaults.eval_entry('real', split='test')
  config.update(overrides)
  return config


def _functions(config, devices):
  mesh = sharding.create_mesh(devices)
  model = model_from_config.create_model(config, 10)
  return compiled.build(config, model, mesh,
                        tx=optim.create_optimizer(config, 10),
                        num_train_steps=10)


def _params(functions):
  """Initialised parameters plus noise (a zero head scores one class)."""
  params = sharding.to_host(functions.init_fn(jax.random.PRNGKey(0)).params)
  rng = np.random.RandomState(1)
  params = jax.tree.map(
      lambda x: x + 0.2 * rng.standard_normal(x.shape).astype(x.dtype),
      params)
  return sharding.put(params, functions.params_sharding)


@pytest.fixture(scope='module')
def results(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  out = {}
  for name, strategy, devices in (('fsdp2', 'fsdp', jax.devices()[:2]),
                                  ('one', 'replicate', jax.devices()[:1])):
    config = _config(data_dir, sharding=strategy)
    functions = _functions(config, devices)
    params = _params(functions)
    runner = evals.Evaluations(config, functions, num_train_steps=10)
    metrics = {}
    for entry in runner.entries:
      metrics.update(runner.run_one(entry, params))
    out[name] = (functions, params, metrics)
  return out


def test_fsdp_parameters_are_split(results):
  functions, params, _ = results['fsdp2']
  kernel = params['MixerBlock_0']['channel_mixing']['Dense_0']['kernel']
  assert kernel.addressable_shards[0].data.shape == (16, 16)  # (16, 32) / 2.
  assert functions.abstract_state.params['stem']['kernel'].sharding == (
      functions.params_sharding['stem']['kernel'])


def test_every_eval_kind_on_fsdp_equals_one_device(results):
  fsdp, one = results['fsdp2'][2], results['one'][2]
  assert fsdp.keys() == one.keys()
  for key in fsdp:
    if key.endswith('examples'):
      assert fsdp[key] == one[key] == 359, key
    else:  # Counts of hits are exact; the loss up to float rounding.
      assert fsdp[key] == pytest.approx(one[key], rel=1e-5), key
  # ReaL with one label per image is top-1 accuracy (a second formula).
  assert fsdp['real/accuracy'] == pytest.approx(fsdp['heldout/accuracy'])
  assert 0.05 < fsdp['heldout/accuracy'] < 0.95  # Not a degenerate head.
