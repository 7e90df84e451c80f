"""Tests of `python -m mixer_jax.benchmark` and of the model it times.

The speed work in `mixer_jax.models` (tokens-major layout, patch-matmul stem,
GELU with a hand-written backward) must compute the same function as the
straightforward `mixer_jax.reference_model`; the first tests check that on
the same parameters, forward and gradients. The rest run the benchmark on a
tiny Mixer and check the report's fields against their definitions.
"""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixer_jax import benchmark
from mixer_jax import models
from mixer_jax import reference_model

TINY = dict(num_blocks=2, hidden_dim=32, tokens_mlp_dim=16,
            channels_mlp_dim=64)
TINY_FLAGS = ['--variant=S_4', '--image_size=16', '--num_classes=10',
              '--num_blocks=2', '--hidden_dim=32', '--tokens_mlp_dim=16',
              '--channels_mlp_dim=64', '--peak_size=128', '--repeats=2']
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _perturbed_params(model, image_size, seed=3):
  """Initial parameters plus noise, so zero-initialised leaves matter too."""
  params = models.init_params(model, jax.random.PRNGKey(0), image_size)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(tree, [
      a + 0.2 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])


def _pair(**options):
  package = models.create_model('S_4', 10, **TINY, **options)
  reference = reference_model.create_reference_model('S_4', 10, **TINY,
                                                     **options)
  return package, reference


def test_same_parameter_tree_and_initial_values():
  package, reference = _pair()
  a = models.init_params(package, jax.random.PRNGKey(7), 16)
  b = models.init_params(reference, jax.random.PRNGKey(7), 16)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.shape == y.shape and x.dtype == y.dtype == jnp.float32
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize('gelu_approximate', [True, False])
def test_package_equals_reference_forward_and_gradients(gelu_approximate):
  package, reference = _pair(gelu_approximate=gelu_approximate)
  params = _perturbed_params(package, 16)
  images = jax.random.uniform(jax.random.PRNGKey(1), (3, 16, 16, 3),
                              minval=-1, maxval=1)
  out_p = jax.jit(lambda p: package.apply({'params': p}, images))(params)
  out_r = reference.apply({'params': params}, images)
  assert out_p.shape == out_r.shape == (3, 10)
  np.testing.assert_allclose(out_p, out_r, atol=2e-5 * np.abs(out_r).max())

  def loss(model):
    # sin() makes every output and its sign matter to the gradient.
    return lambda p: jnp.sum(jnp.sin(model.apply({'params': p}, images,
                                                 train=True)))
  grads_p = jax.jit(jax.grad(loss(package)))(params)
  grads_r = jax.grad(loss(reference))(params)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads_r))
  assert scale > 0.1
  for path, gp in jax.tree_util.tree_leaves_with_path(grads_p):
    gr = grads_r
    for key in path:
      gr = gr[key.key]
    np.testing.assert_allclose(gp, gr, atol=2e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))


def test_bfloat16_package_close_to_reference():
  package, reference = _pair(dtype='bfloat16')
  params = _perturbed_params(package, 16)
  images = jax.random.uniform(jax.random.PRNGKey(2), (2, 16, 16, 3),
                              minval=-1, maxval=1)
  out_p = package.apply({'params': params}, images)
  out_r = reference.apply({'params': params}, images)
  f32 = models.create_model('S_4', 10, **TINY).apply({'params': params},
                                                      images)
  # Same bfloat16 arithmetic in a different order: as close to each other
  # as each is to float32.
  tol = 0.05 * float(jnp.abs(f32).max())
  np.testing.assert_allclose(out_p, out_r, atol=tol)
  np.testing.assert_allclose(out_p, f32, atol=tol)


def test_mixer_block_layouts_agree():
  block_bsc = models.MixerBlock(16, 64)
  block_sbc = models.MixerBlock(16, 64, tokens_major=True)
  x = jax.random.normal(jax.random.PRNGKey(4), (3, 5, 32))  # (B, S, C)
  params = block_bsc.init(jax.random.PRNGKey(0), x)['params']
  params = jax.tree.map(lambda a: a + 0.1, params)
  a = block_bsc.apply({'params': params}, x)
  b = block_sbc.apply({'params': params}, jnp.swapaxes(x, 0, 1))
  np.testing.assert_allclose(a, jnp.swapaxes(b, 0, 1), atol=1e-5)


def test_peak_matmul_is_a_real_matmul():
  fn, flops = benchmark.make_peak_fn(64, jnp.float32)
  assert flops == 2 * 64 ** 3
  out = np.asarray(fn())
  a, b = (np.asarray(x) for x in fn.args)
  np.testing.assert_allclose(out, a @ b, rtol=1e-4, atol=1e-4)


def test_train_step_updates_parameters_and_keeps_callers_copy():
  model = models.create_model('S_4', 10, **TINY)
  params = _perturbed_params(model, 16)
  before = jax.tree.map(np.asarray, params)
  run, compile_s, memory = benchmark.make_step(model, 'train', 'adam', params,
                                               4, 16, 10)
  losses = [float(run()) for _ in range(3)]
  assert compile_s > 0 and memory > 0
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]
  # The caller's parameters survive the donated steps unchanged.
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(before)):
    np.testing.assert_array_equal(x, y)


def test_rows_are_consistent_with_their_definitions(monkeypatch):
  # Real steps and matmuls run, but their durations are fixed, so every
  # derived field can be checked exactly against its definition.
  def fixed_timer(fn):
    jax.block_until_ready(fn())
    return 0.25 if isinstance(fn, functools.partial) else 2.0  # Peak: 0.25.
  monkeypatch.setattr(benchmark, '_timed', fixed_timer)
  rows = benchmark.run_benchmark(
      variant='S_4', mode='compare', batch_sizes=[2], image_size=16,
      dtype='float32', repeats=3, num_classes=10, peak_size=128, sizes=TINY)
  assert [(r['mode'], r['impl']) for r in rows] == [
      ('infer', 'reference'), ('infer', 'package'),
      ('train', 'reference'), ('train', 'package')]
  model = models.create_model('S_4', 10, **TINY)
  forward = models.flops_per_image(model, 16) / 1e9
  peak = 2 * 128 ** 3 / 0.25 / 1e9
  for r in rows:
    gflop = forward * (3 if r['mode'] == 'train' else 1)
    assert r['gflop_per_image'] == pytest.approx(gflop)
    assert r['images_per_sec'] == pytest.approx(2 / 2.0)
    assert r['achieved_gflops'] == pytest.approx(gflop * 2 / 2.0)
    assert r['peak_gflops'] == pytest.approx(peak)
    assert r['peak_fraction'] == pytest.approx(gflop / peak)
    assert r['step_time_spread'] == 0.0 and r['compile_s'] > 0
    assert r['max_rss_mb'] > 10 and r['compiled_memory_mb'] > 0
  package = [r for r in rows if r['impl'] == 'package']
  reference = [r for r in rows if r['impl'] == 'reference']
  for p, r in zip(package, reference):
    assert p['speedup_vs_reference'] == pytest.approx(1.0)
    assert 'speedup_vs_reference' not in r
  table = benchmark.format_table(rows)
  assert benchmark.processor_name() in table
  assert 'img/s' in table and 'of peak' in table and 'vs ref' in table
  assert len(table.splitlines()) == 1 + 1 + len(rows) + 1


def test_bad_arguments_raise_clear_errors():
  with pytest.raises(ValueError, match='batch_size'):
    benchmark.benchmark_configs(impls=['package'], variant='S_4', mode='infer',
                                batch_size=0, image_size=16, dtype='float32',
                                repeats=1, sizes=TINY)
  with pytest.raises(ValueError, match='mode'):
    benchmark.run_benchmark(variant='S_4', mode='fast', batch_sizes=[1],
                            image_size=16, dtype='float32', repeats=1)
  with pytest.raises(ValueError, match='implementation'):
    benchmark.build_model('mine', 'S_4', 10, 'float32', {})


def _run_cli(*flags):
  return subprocess.run(
      [sys.executable, '-m', 'mixer_jax.benchmark', *flags],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=ROOT))


def test_command_json_output():
  result = _run_cli(*TINY_FLAGS, '--mode=train', '--batch_size=2,3',
                    '--optimizer=adam', '--dtype=bfloat16', '--json')
  assert result.returncode == 0, result.stderr[-2000:]
  rows = [json.loads(line) for line in result.stdout.splitlines()
          if line.startswith('{')]
  assert [r['batch_size'] for r in rows] == [2, 3]
  for r in rows:
    assert (r['variant'], r['mode'], r['dtype'], r['impl'], r['optimizer']) == (
        'S_4', 'train', 'bfloat16', 'package', 'adam')
    for key in ('images_per_sec', 'peak_fraction', 'compile_s',
                'achieved_gflops', 'peak_gflops', 'max_rss_mb'):
      assert np.isfinite(r[key]) and r[key] > 0, key
    assert r['device'].startswith(benchmark.processor_name())


def test_command_table_and_bad_flag():
  result = _run_cli(*TINY_FLAGS, '--mode=infer', '--batch_size=2')
  assert result.returncode == 0, result.stderr[-2000:]
  assert benchmark.processor_name() in result.stdout
  assert 'img/s' in result.stdout
  bad = _run_cli(*TINY_FLAGS, '--batch_size=two')
  assert bad.returncode != 0 and '--batch_size' in bad.stderr
