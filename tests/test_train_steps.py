"""Tests of the jitted train/eval steps: devices, accumulation, compile once."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import datasets as sk_datasets

from configs import quickstart
from mixer_jax import model_from_config
from mixer_jax.training import compiled
from mixer_jax.training import optim
from mixer_jax.training import sharding
from mixer_jax.training import train_steps
from mixer_jax.training import trainer
import run_state


def tiny_config(**overrides):
  config = quickstart.get_config()
  config.model.num_blocks, config.model.hidden_dim = 1, 16
  config.model.tokens_mlp_dim, config.model.channels_mlp_dim = 8, 32
  config.batch_size, config.num_train_steps, config.warmup_steps = 32, 10, 1
  # SGD keeps float rounding at float level; Adam's g / sqrt(v) would blow
  # up rounding noise of near-zero gradients and hide real differences.
  config.optimizer, config.b1, config.learning_rate = 'sgd', 0.9, 0.1
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def digits():
  data = sk_datasets.load_digits()
  images = np.round(data.images * 255 / 16) / 127.5 - 1.0
  images = np.repeat(images[..., None], 3, axis=-1).astype(np.float32)
  labels = np.eye(10, dtype=np.float32)[data.target]
  return images, labels


def batches(digits, batch_size, count):
  images, labels = digits
  return [{'image': images[i * batch_size:(i + 1) * batch_size],
           'label': labels[i * batch_size:(i + 1) * batch_size]}
          for i in range(count)]


def run_steps(config, data, devices=None):
  """Trains on `data`; returns (state, host metrics, extras)."""
  mesh = sharding.create_mesh(devices)
  model = model_from_config.create_model(config, 10)
  tx = optim.create_optimizer(config, config.num_train_steps)
  steps = compiled.build(config, model, mesh, tx=tx,
                         num_train_steps=config.num_train_steps)
  state = steps.init_fn(jax.random.PRNGKey(config.seed))
  first_params = state.params
  metrics = []
  with run_state.compilations() as names:
    for batch in data:
      state, m = steps.train_step(state, sharding.shard_batch(batch, mesh))
      metrics.append(jax.device_get(m))
  extras = dict(train_step=steps.train_step, eval_step=steps.eval_step,
                mesh=mesh, first_params=first_params,
                train_compilations=names.count('jit(train_step)'))
  return state, metrics, extras


@pytest.fixture(scope='module')
def base_run(digits):
  return run_steps(tiny_config(), batches(digits, 32, 3))


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0],
                          jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                               atol=atol, err_msg=str(path))


def test_first_loss_is_log_num_classes(base_run):
  # The head starts at zero, so every class gets logit 0 at step 0.
  _, metrics, _ = base_run
  assert metrics[0]['loss'] == pytest.approx(math.log(10), rel=1e-5)
  assert metrics[0]['learning_rate'] == 0.0  # First warmup step.
  assert metrics[1]['learning_rate'] == pytest.approx(0.1)
  assert metrics[2]['loss'] < metrics[0]['loss']
  zeros = jnp.zeros((2, 10))
  sigmoid = train_steps.per_example_loss(zeros, jnp.eye(10)[:2],
                                                'sigmoid')
  np.testing.assert_allclose(sigmoid, [10 * math.log(2)] * 2, rtol=1e-6)


def test_eight_devices_match_one_device(digits):
  # Same global batch, stochastic depth and the weights' EMA on: only the
  # placement differs.
  config = tiny_config(grad_accum_steps=2, ema_decay=0.5)
  config.model.stochastic_depth = 0.3
  data = batches(digits, 32, 3)
  state8, m8, _ = run_steps(config, data)
  state1, m1, _ = run_steps(config, data, jax.devices()[:1])
  assert_trees_close(state8.params, state1.params)
  assert_trees_close(state8.ema_params, state1.ema_params)
  # The EMA is placed as the parameters are, leaf by leaf.
  for ema, param in zip(jax.tree.leaves(state8.ema_params),
                        jax.tree.leaves(state8.params)):
    assert ema.sharding == param.sharding
  np.testing.assert_allclose([m['loss'] for m in m8],
                             [m['loss'] for m in m1], rtol=1e-5)
  assert not np.allclose(jax.device_get(state8.params['head']['kernel']), 0)


def test_gradient_accumulation_equals_full_batch(digits, base_run):
  full, m_full, _ = base_run
  accum, m_accum, _ = run_steps(tiny_config(grad_accum_steps=4),
                                batches(digits, 32, 3))
  assert_trees_close(full.params, accum.params, rtol=1e-4, atol=1e-6)
  for a, b in zip(m_full, m_accum):
    assert a['loss'] == pytest.approx(b['loss'], rel=1e-5)
    assert a['grad_norm'] == pytest.approx(b['grad_norm'], rel=1e-4)


def test_compiles_once_and_donates_state(base_run):
  state, _, extras = base_run
  assert extras['train_compilations'] == 1  # Compiled once.
  assert jax.tree.leaves(extras['first_params'])[0].is_deleted()  # Donated.
  assert state.step.dtype == jnp.int32 and int(state.step) == 3


def test_eval_step_ignores_padding(digits, base_run):
  state, _, extras = base_run
  eval_step, mesh = extras['eval_step'], extras['mesh']
  images, labels = digits
  mask = np.zeros(32, np.float32)
  mask[:20] = 1.0
  padded = {'image': images[:32].copy(), 'label': labels[:32].copy(),
            'mask': mask}
  padded['image'][20:] = 0.0  # Padding content must not matter.
  padded['label'][20:] = 0.0
  sums = jax.device_get(eval_step(state.params, sharding.shard_batch(padded,
                                                                  mesh)))
  logits = state.apply_fn({'params': jax.device_get(state.params)},
                          images[:20], train=False)
  correct = np.sum(np.argmax(logits, -1) == np.argmax(labels[:20], -1))
  assert sums['count'] == 20 and sums['correct'] == correct
  expected_loss = -np.sum(labels[:20] * jax.nn.log_softmax(logits))
  assert sums['loss_sum'] == pytest.approx(float(expected_loss), rel=1e-4)


def test_label_smoothing_loss():
  logits = jnp.array([[2.0, 0.0, -1.0]])
  labels = jnp.array([[1.0, 0.0, 0.0]])
  log_p = np.asarray(jax.nn.log_softmax(logits))[0]
  smoothed = np.array([0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3])
  expected = -np.sum(smoothed * log_p)
  loss = train_steps.per_example_loss(logits, labels, 'softmax', 0.1)
  assert float(loss[0]) == pytest.approx(expected, rel=1e-6)


def test_bfloat16_compute_keeps_float32_params(digits, base_run):
  config = tiny_config()
  config.model.dtype = 'bfloat16'
  state, metrics, _ = run_steps(config, batches(digits, 32, 3))
  dtypes = {x.dtype for x in jax.tree.leaves(state.params)}
  assert dtypes == {jnp.dtype('float32')}
  _, metrics32, _ = base_run
  # Same start (zero head), bfloat16 rounding only: close but not equal.
  assert metrics[0]['loss'] == pytest.approx(math.log(10), rel=1e-3)
  losses = np.array([m['loss'] for m in metrics])
  losses32 = np.array([m['loss'] for m in metrics32])
  np.testing.assert_allclose(losses, losses32, rtol=0.05)
  assert not np.array_equal(losses, losses32)


def test_num_train_steps_from_epochs():
  config = tiny_config(num_train_steps=-1, num_epochs=2.5, batch_size=64)
  assert trainer.num_train_steps_for(config, 1438) == 57  # ceil(56.17).
  assert trainer.num_train_steps_for(tiny_config(), 1438) == 10


def test_mixup_mixes_each_example_with_the_one_before_it():
  # big_vision's utils.get_mixup: a = max(a, 1 - a), then
  # a * x + (1 - a) * roll(x, 1): example i takes example i - 1.
  images = jnp.arange(8, dtype=jnp.float32).reshape(8, 1, 1, 1) * jnp.ones(
      (8, 2, 2, 3))
  labels = jax.nn.one_hot(jnp.arange(8) % 4, 4)
  partner = np.array([7, 0, 1, 2, 3, 4, 5, 6])
  lams = []
  for seed in range(200):
    out_images, out_labels = train_steps.mixup(
        jax.random.PRNGKey(seed), images, labels, alpha=0.5, prob=0.5)
    lam = 1.0 - float(out_images[0, 0, 0, 0]) / 7  # (1 - lam) * 7.
    np.testing.assert_allclose(
        out_images[:, 0, 0, 0], lam * np.arange(8) + (1 - lam) * partner,
        atol=1e-5)
    np.testing.assert_allclose(
        out_labels, lam * labels + (1 - lam) * labels[partner], atol=1e-6)
    lams.append(lam)
  lams = np.array(lams)
  mixed = lams[np.abs(lams - 1) > 1e-6]
  assert 0.35 < len(mixed) / len(lams) < 0.65  # prob = 0.5.
  # max(a, 1 - a) of Beta(0.5, 0.5) (the arcsine law): in [1/2, 1], mean
  # 1/2 + 1/pi.
  assert mixed.min() >= 0.5 - 1e-6
  assert abs(mixed.mean() - (0.5 + 1 / np.pi)) < 0.05


def test_mixup_partners_cross_device_boundaries():
  # 4 examples on 2 devices: example 2 (first of device 1) takes example 1
  # (last of device 0), example 0 takes example 3.
  mesh = sharding.create_mesh(jax.devices()[:2])
  x = np.array([[10.0], [20.0], [30.0], [40.0]], np.float32)
  placed = jax.device_put(x, sharding.batch_sharding(mesh))
  images, labels = jax.jit(lambda v: train_steps.mixup(
      jax.random.PRNGKey(3), v, v, alpha=0.5, prob=1.0))(placed)
  lam = (float(images[1, 0]) - 10.0) / 10.0  # lam * 20 + (1 - lam) * 10.
  assert lam >= 0.5
  np.testing.assert_allclose(
      images[:, 0], lam * x[:, 0] + (1 - lam) * np.array([40, 10, 20, 30]),
      rtol=1e-6)
  np.testing.assert_array_equal(images, labels)


def test_mixup_step_on_eight_devices_equals_one(digits):
  config = tiny_config(num_train_steps=3)
  config.pp.mixup_alpha, config.pp.mixup_prob = 0.5, 1.0
  data = batches(digits, 32, 3)
  state8, metrics8, _ = run_steps(config, data)
  state1, metrics1, _ = run_steps(config, data, jax.devices()[:1])
  for m8, m1 in zip(metrics8, metrics1):
    np.testing.assert_allclose(m8['loss'], m1['loss'], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state8.params),
                  jax.tree.leaves(state1.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-6)
  # The zero head makes every first loss log(10); later ones see mixup.
  no_mixup = run_steps(tiny_config(num_train_steps=3), data)[1]
  assert not np.allclose(metrics8[-1]['loss'], no_mixup[-1]['loss'])


def test_ema_is_the_running_average_of_the_parameters(digits):
  config = tiny_config()
  model = model_from_config.create_model(config, 10)
  tx = optim.create_optimizer(config, config.num_train_steps)
  rng = jax.random.PRNGKey(0)
  state = train_steps.create_train_state(model, tx, rng, 8, ema=True)
  plain = train_steps.create_train_state(model, tx, rng, 8)
  assert plain.ema_params is None  # Off: the state's tree is as before.
  step = jax.jit(lambda s, b: train_steps.train_step(s, b, ema_decay=0.9))
  seen = [jax.device_get(state.params)]
  for batch in batches(digits, 32, 3):
    state, _ = step(state, batch)
    plain, _ = step(plain, batch)
    seen.append(jax.device_get(state.params))
  # e0 = p0, e_t = 0.9 e_(t-1) + 0.1 p_t, written out after three steps:
  # e3 = 0.729 p0 + 0.081 p1 + 0.09 p2 + 0.1 p3.
  weights = (0.729, 0.081, 0.09, 0.1)
  expected = jax.tree.map(
      lambda *ps: sum(w * np.asarray(p, np.float64)
                      for w, p in zip(weights, ps)), *seen)
  for got, want in zip(jax.tree.leaves(state.ema_params),
                       jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # The EMA only watches: the parameters train exactly as without it.
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(plain.params)):
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(jax.tree.leaves(state.ema_params)[0],
                         jax.tree.leaves(state.params)[0])


def logits_as_images(variables, images, train):
  """A stand-in forward pass whose logits are its input, to set exact ties."""
  del variables, train
  return images


def eval_sums(logits, labels, top_k=5):
  logits = jnp.asarray(logits, jnp.float32)
  batch = {'image': logits,
           'label': jax.nn.one_hot(jnp.asarray(labels), logits.shape[-1]),
           'mask': jnp.ones(logits.shape[0])}
  return jax.device_get(train_steps.eval_step(
      {}, batch, apply_fn=logits_as_images, top_k=top_k))


def test_zero_head_ranks_classes_by_index():
  # The real model at initialisation: the head is zero, so all 10 logits are
  # equal, and argmax (big_vision's top-1) picks class 0; top-5 holds
  # classes 0-4. Labels 0-9 twice: 2 top-1 hits, 10 top-5 hits.
  model = model_from_config.create_model(tiny_config(), 10)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)),
                      train=False)['params']
  images = jax.random.uniform(jax.random.PRNGKey(1), (20, 8, 8, 3))
  batch = {'image': images, 'label': jax.nn.one_hot(jnp.arange(20) % 10, 10),
           'mask': jnp.ones(20)}
  sums = jax.device_get(train_steps.eval_step(params, batch,
                                              apply_fn=model.apply))
  assert (sums['count'], sums['correct'], sums['top5']) == (20, 2, 10)
  assert sums['loss_sum'] == pytest.approx(20 * math.log(10), rel=1e-5)


def test_top1_is_argmax_ties_go_to_the_lower_index_nan_rows_counted():
  logits = [[1.0, 2.0, 2.0, 0.0],  # Label 1 ties with class 2: hit.
            [1.0, 2.0, 2.0, 0.0],  # Label 2: class 1 ranks first.
            [3.0, 1.0, 1.0, 1.0],  # Label 0 alone on top.
            [0.0, np.nan, 5.0, 1.0],  # argmax is the NaN: label 2 second.
            [np.nan] * 4,  # argmax is the first NaN: label 0 hits.
            [-np.inf, np.inf, 0.0, 0.0]]  # Label 1 at +inf: a hit.
  labels = [1, 2, 0, 2, 0, 1]
  top1, top2 = eval_sums(logits, labels, 1), eval_sums(logits, labels, 2)
  assert top1['correct'] == np.sum(np.argmax(logits, -1) == labels) == 4
  assert (top1['top5'], top2['top5']) == (4, 6)  # By hand, as above.
  assert top1['nan_rows'] == 2


def test_top_k_equals_a_stable_descending_sort_with_ties():
  # A second way: the label's position in a stable sort (ties keep index
  # order, as argmax), on integer logits with many ties.
  rng = np.random.RandomState(0)
  logits = rng.randint(0, 3, (64, 10)).astype(np.float32)
  labels = rng.randint(0, 10, 64)
  order = np.argsort(-logits, axis=-1, kind='stable')
  position = np.argmax(order == labels[:, None], axis=-1)
  sums = eval_sums(logits, labels, top_k=5)
  assert sums['correct'] == np.sum(np.argmax(logits, -1) == labels)
  assert sums['top5'] == np.sum(position < 5)
  assert sums['nan_rows'] == 0


def test_top_k_equals_sorting_when_no_logits_tie():
  # A second way: the label's rank in a descending sort, on random logits.
  rng = np.random.RandomState(0)
  logits = rng.randn(64, 10).astype(np.float32)
  labels = rng.randint(0, 10, 64)
  ranks = np.argsort(np.argsort(-logits, axis=-1), axis=-1)
  label_rank = ranks[np.arange(64), labels]
  sums = eval_sums(logits, labels, top_k=5)
  assert sums['correct'] == np.sum(label_rank == 0)
  assert sums['top5'] == np.sum(label_rank < 5)
