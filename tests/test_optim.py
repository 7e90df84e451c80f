"""Tests of mixer_jax.training.optim against hand-computed numbers."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mixer_jax import models
from mixer_jax.training import optim


def make_config(**overrides):
  config = ml_collections.ConfigDict(dict(
      optimizer='sgd', learning_rate=1.0, lr_schedule='linear',
      warmup_steps=10, end_learning_rate=0.1, b1=0.0, b2=0.999,
      momentum_dtype='float32', weight_decay=0.0, grad_clip_norm=0.0))
  config.update(overrides)
  return config


def run_updates(config, num_train_steps, params, grads_per_step):
  tx = optim.create_optimizer(config, num_train_steps)
  opt_state = tx.init(params)
  for grads in grads_per_step:
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  return params, opt_state


@pytest.mark.parametrize('t, expected', [
    (0, 0.0), (5, 0.5), (9, 0.9), (10, 1.0), (35, 0.775), (60, 0.55),
    (110, 0.1), (500, 0.1)])
def test_linear_schedule_values(t, expected):
  # warmup 10, 111 steps: decay over t = 10..110, from 1 to end 0.1.
  lr = optim.learning_rate_fn(make_config(), 111)
  assert float(lr(t)) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize('t, expected', [
    (5, 0.5), (10, 1.0), (35, 0.1 + 0.45 * (1 + math.cos(math.pi / 4))),
    (60, 0.55), (85, 0.1 + 0.45 * (1 + math.cos(3 * math.pi / 4))),
    (110, 0.1)])
def test_cosine_schedule_values(t, expected):
  lr = optim.learning_rate_fn(make_config(lr_schedule='cosine'), 111)
  assert float(lr(t)) == pytest.approx(expected, abs=1e-6)


def test_schedule_scales_with_peak_and_ends_at_end_learning_rate():
  config = make_config(learning_rate=0.03, end_learning_rate=0.0,
                       lr_schedule='cosine', warmup_steps=500)
  lr = optim.learning_rate_fn(config, 10_000)
  assert float(lr(250)) == pytest.approx(0.015, rel=1e-6)
  assert float(lr(500)) == pytest.approx(0.03, rel=1e-6)
  assert float(lr(9_999)) == pytest.approx(0.0, abs=1e-9)


def test_no_warmup_starts_at_peak():
  lr = optim.learning_rate_fn(make_config(warmup_steps=0), 11)
  assert float(lr(0)) == pytest.approx(1.0)
  assert float(lr(5)) == pytest.approx(0.55)


def test_sgd_with_decoupled_weight_decay_follows_schedule_not_lr():
  # update = -shape(t) * (lr * g + wd * param) for kernels, no decay of bias.
  config = make_config(learning_rate=0.5, warmup_steps=0, weight_decay=0.1,
                       end_learning_rate=0.05)  # shape: 1.0, then 0.1.
  params = {'dense': {'kernel': jnp.array([[2.0]]), 'bias': jnp.array([3.0])}}
  grads = {'dense': {'kernel': jnp.array([[1.0]]), 'bias': jnp.array([1.0])}}
  new, _ = run_updates(config, 2, params, [grads, grads])
  k1 = 2.0 - 1.0 * (0.5 * 1.0 + 0.1 * 2.0)  # 1.3
  k2 = k1 - 0.1 * (0.5 * 1.0 + 0.1 * k1)  # 1.237
  b2 = 3.0 - 1.0 * 0.5 - 0.1 * 0.5  # 2.45
  np.testing.assert_allclose(new['dense']['kernel'], [[k2]], rtol=1e-6)
  np.testing.assert_allclose(new['dense']['bias'], [b2], rtol=1e-6)


def test_weight_decay_is_not_multiplied_by_learning_rate():
  # big_vision's wd=1e-4 differs from optax.adamw(weight_decay=1e-4): with a
  # tiny learning rate and no gradient the kernel still shrinks by wd.
  config = make_config(optimizer='adam', learning_rate=1e-6, warmup_steps=0,
                       end_learning_rate=1e-6, weight_decay=0.25)
  params = {'kernel': jnp.array([4.0, -8.0])}
  zeros = {'kernel': jnp.zeros(2)}
  new, _ = run_updates(config, 3, params, [zeros] * 3)
  np.testing.assert_allclose(new['kernel'], [4.0 * 0.75 ** 3,
                                             -8.0 * 0.75 ** 3], rtol=1e-6)


def test_adam_first_step_and_clipping():
  # Adam's first bias-corrected step is g / (|g| + eps) ~= sign(g); gradient
  # (3, 4) clipped to norm 1 is (0.6, 0.8): the sign is unchanged.
  config = make_config(optimizer='adam', learning_rate=0.1, warmup_steps=0,
                       end_learning_rate=0.1, b1=0.9, grad_clip_norm=1.0)
  params = {'bias': jnp.array([1.0, 1.0])}
  new, _ = run_updates(config, 5, params, [{'bias': jnp.array([3.0, -4.0])}])
  np.testing.assert_allclose(new['bias'], [0.9, 1.1], rtol=1e-5)


def test_global_norm_clipping_of_sgd_step():
  config = make_config(warmup_steps=0, end_learning_rate=1.0,
                       grad_clip_norm=1.0)
  params = {'bias': jnp.zeros(2)}
  new, _ = run_updates(config, 3, params, [{'bias': jnp.array([3.0, 4.0])}])
  np.testing.assert_allclose(new['bias'], [-0.6, -0.8], rtol=1e-6)


def test_sgd_momentum_two_steps():
  config = make_config(b1=0.9, warmup_steps=0, learning_rate=0.1,
                       end_learning_rate=0.05)  # shapes 1.0 then 0.5.
  params = {'bias': jnp.array([1.0])}
  g1, g2 = jnp.array([1.0]), jnp.array([2.0])
  new, _ = run_updates(config, 2, params, [{'bias': g1}, {'bias': g2}])
  m2 = 0.9 * 1.0 + 2.0
  expected = 1.0 - 0.1 * 1.0 - 0.5 * 0.1 * m2
  np.testing.assert_allclose(new['bias'], [expected], rtol=1e-6)


def test_momentum_dtype_bfloat16():
  for name in ('sgd', 'adam'):
    config = make_config(optimizer=name, b1=0.9, momentum_dtype='bfloat16')
    tx = optim.create_optimizer(config, 100)
    state = tx.init({'w': jnp.zeros((3,), jnp.float32)})
    dtypes = {x.dtype for x in jax.tree.leaves(state) if x.shape == (3,)}
    assert jnp.dtype('bfloat16') in dtypes, (name, dtypes)


def test_kernel_mask_on_mixer_params():
  model = models.create_model('S_4', 10, num_blocks=1, hidden_dim=8,
                              tokens_mlp_dim=4, channels_mlp_dim=8)
  params = models.param_shapes(model, 8)
  mask = optim.kernel_mask(params)
  assert mask['stem']['kernel'] and mask['head']['kernel']
  block = mask['MixerBlock_0']
  assert block['token_mixing']['Dense_0']['kernel']
  assert not block['token_mixing']['Dense_0']['bias']
  assert not block['LayerNorm_0']['scale']
  assert not mask['head']['bias']
  flat = jax.tree.leaves(mask)
  assert sum(flat) == 6  # stem, 2 token + 2 channel Dense, head.


@pytest.mark.parametrize('field, value', [('optimizer', 'adamw'),
                                          ('lr_schedule', 'step'),
                                          ('momentum_dtype', 'float16')])
def test_unknown_enum_values_are_rejected(field, value):
  with pytest.raises(ValueError, match=field):
    optim.create_optimizer(make_config(**{field: value}), 10)
