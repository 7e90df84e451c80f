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
      warmup_steps=10, end_learning_rate_multiplier=0.1, b1=0.0, b2=0.999,
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


# Expected values below are big_vision's utils.create_learning_rate_schedule
# (base 1) worked out by hand, for update t counted from 0 (optax's count,
# which big_vision's scale_by_schedule and vit_jax's optax.sgd both read):
#   multiplier(t) = min(1, t / warmup) * decay(p),
#   p = clip((t - warmup) / (T - warmup), 0, 1),
#   linear: end + (1 - end) (1 - p);  cosine: end + (1 - end) (1 + cos pi p) / 2.
# Warmup 10, T = 110 updates (t = 0..109), end 0.1, peak 1.
@pytest.mark.parametrize('t, expected', [
    (0, 0.0), (5, 0.5), (9, 0.9),  # Warmup: t / 10.
    (10, 1.0), (35, 0.775), (60, 0.55),  # p = 0, 1/4, 1/2.
    (108, 0.118), (109, 0.109),  # p = 98/100, 99/100: the last two updates.
    (110, 0.1), (500, 0.1)])  # The end is reached one past the last update.
def test_linear_schedule_values(t, expected):
  lr = optim.learning_rate_fn(make_config(), 110)
  assert float(lr(t)) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize('t, expected', [
    (5, 0.5), (10, 1.0), (35, 0.1 + 0.45 * (1 + math.cos(math.pi / 4))),
    (60, 0.55), (85, 0.1 + 0.45 * (1 + math.cos(3 * math.pi / 4))),
    (109, 0.1 + 0.45 * (1 + math.cos(0.99 * math.pi))), (110, 0.1)])
def test_cosine_schedule_values(t, expected):
  lr = optim.learning_rate_fn(make_config(lr_schedule='cosine'), 110)
  assert float(lr(t)) == pytest.approx(expected, abs=1e-6)


def test_big_vision_imagenet_recipe_end_is_relative():
  # mlp_mixer_i1k.py: lr 1e-3, warmup 10k, linear decay, linear_end 1e-5,
  # here over T = 92,896 updates (300 epochs of train[:99%] at batch 4096).
  # The end is 1e-3 * 1e-5, not 1e-5; the last update is 1/(T - 10k) above it.
  config = make_config(learning_rate=1e-3, warmup_steps=10_000,
                       end_learning_rate_multiplier=1e-5)
  total = 92_896
  lr = optim.learning_rate_fn(config, total)
  decay = total - 10_000
  # float32 schedule: relative tolerances of its rounding (1 - p near the end
  # is a difference of nearly equal numbers, hence the looser last check).
  assert float(lr(1)) == pytest.approx(1e-7, rel=1e-4)
  assert float(lr(10_000)) == pytest.approx(1e-3, rel=1e-5)
  half = 10_000 + decay // 2  # p = 1/2 exactly (decay is even).
  assert float(lr(half)) == pytest.approx(1e-3 * (1e-5 + (1 - 1e-5) / 2),
                                          rel=1e-5)
  assert float(lr(total - 1)) == pytest.approx(
      1e-3 * (1e-5 + (1 - 1e-5) / decay), rel=1e-2)  # 2.2e-8.
  assert float(lr(total)) == pytest.approx(1e-8, rel=1e-4)


def test_vit_jax_finetune_cosine_to_zero():
  # vit_jax: lr 0.03, warmup 500, cosine over 10,000 updates to 0.
  config = make_config(learning_rate=0.03, end_learning_rate_multiplier=0.0,
                       lr_schedule='cosine', warmup_steps=500)
  lr = optim.learning_rate_fn(config, 10_000)
  assert float(lr(250)) == pytest.approx(0.015, rel=1e-6)
  assert float(lr(500)) == pytest.approx(0.03, rel=1e-6)
  assert float(lr(5_250)) == pytest.approx(0.015, rel=1e-5)  # p = 1/2.
  # Near the end 1 + cos(pi p) is a float32 difference of nearly equal
  # numbers (~1e-9 absolute): compare 10 updates before the end, with 5%.
  near_end = 0.03 * 0.5 * (1 + math.cos(math.pi * 9_490 / 9_500))  # 8.2e-8
  assert float(lr(9_990)) == pytest.approx(near_end, rel=5e-2)
  assert float(lr(9_999)) > 0  # Not yet 0 at the last update.
  assert float(lr(10_000)) == pytest.approx(0.0, abs=1e-12)


def test_no_warmup_starts_at_peak():
  # T = 10: p = t / 10, so t = 5 gives 0.1 + 0.9 * 0.5.
  lr = optim.learning_rate_fn(make_config(warmup_steps=0), 10)
  assert float(lr(0)) == pytest.approx(1.0)
  assert float(lr(5)) == pytest.approx(0.55)


def test_sgd_with_decoupled_weight_decay_follows_schedule_not_lr():
  # update = -shape(t) * (lr * g + wd * param) for kernels, no decay of bias.
  # T = 2, no warmup, end 0.1: shape(0) = 1, shape(1) = 0.1 + 0.9 / 2 = 0.55.
  config = make_config(learning_rate=0.5, warmup_steps=0, weight_decay=0.1,
                       end_learning_rate_multiplier=0.1)
  params = {'dense': {'kernel': jnp.array([[2.0]]), 'bias': jnp.array([3.0])}}
  grads = {'dense': {'kernel': jnp.array([[1.0]]), 'bias': jnp.array([1.0])}}
  new, _ = run_updates(config, 2, params, [grads, grads])
  k1 = 2.0 - 1.0 * (0.5 * 1.0 + 0.1 * 2.0)  # 1.3
  k2 = k1 - 0.55 * (0.5 * 1.0 + 0.1 * k1)  # 0.95350
  b2 = 3.0 - 1.0 * 0.5 - 0.55 * 0.5  # 2.225
  np.testing.assert_allclose(new['dense']['kernel'], [[k2]], rtol=1e-6)
  np.testing.assert_allclose(new['dense']['bias'], [b2], rtol=1e-6)


def test_weight_decay_is_not_multiplied_by_learning_rate():
  # big_vision's wd=1e-4 differs from optax.adamw(weight_decay=1e-4): with a
  # tiny learning rate and no gradient the kernel still shrinks by wd.
  config = make_config(optimizer='adam', learning_rate=1e-6, warmup_steps=0,
                       end_learning_rate_multiplier=1.0, weight_decay=0.25)
  params = {'kernel': jnp.array([4.0, -8.0])}
  zeros = {'kernel': jnp.zeros(2)}
  new, _ = run_updates(config, 3, params, [zeros] * 3)
  np.testing.assert_allclose(new['kernel'], [4.0 * 0.75 ** 3,
                                             -8.0 * 0.75 ** 3], rtol=1e-6)


def test_adam_first_step_and_clipping():
  # Adam's first bias-corrected step is g / (|g| + eps) ~= sign(g); gradient
  # (3, 4) clipped to norm 1 is (0.6, 0.8): the sign is unchanged.
  config = make_config(optimizer='adam', learning_rate=0.1, warmup_steps=0,
                       end_learning_rate_multiplier=1.0, b1=0.9,
                       grad_clip_norm=1.0)
  params = {'bias': jnp.array([1.0, 1.0])}
  new, _ = run_updates(config, 5, params, [{'bias': jnp.array([3.0, -4.0])}])
  np.testing.assert_allclose(new['bias'], [0.9, 1.1], rtol=1e-5)


def test_global_norm_clipping_of_sgd_step():
  config = make_config(warmup_steps=0, end_learning_rate_multiplier=1.0,
                       grad_clip_norm=1.0)
  params = {'bias': jnp.zeros(2)}
  new, _ = run_updates(config, 3, params, [{'bias': jnp.array([3.0, 4.0])}])
  np.testing.assert_allclose(new['bias'], [-0.6, -0.8], rtol=1e-6)


def test_sgd_momentum_two_steps():
  config = make_config(b1=0.9, warmup_steps=0, learning_rate=0.1,
                       end_learning_rate_multiplier=0.0)  # 1.0, then 0.5.
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
