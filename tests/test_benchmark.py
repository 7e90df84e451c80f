"""Tests of `python -m mixer_jax.benchmark` on a tiny Mixer.

Each report field is checked against its definition: timings through a
fixed timer, the scaling fields against the mesh (1/N of the FLOPs, the
collectives data parallelism needs, 1/N of the state under fsdp).
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
from mixer_jax.training import cost

TINY = dict(num_blocks=2, hidden_dim=32, tokens_mlp_dim=16,
            channels_mlp_dim=64)
TINY_FLAGS = ['--variant=S_4', '--image_size=16', '--num_classes=16',
              '--num_blocks=2', '--hidden_dim=32', '--tokens_mlp_dim=16',
              '--channels_mlp_dim=64', '--peak_size=128', '--repeats=2']
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_peak_matmul_is_a_real_matmul():
  fn, flops = benchmark.make_peak_fn(64, jnp.float32)
  assert flops == 2 * 64 ** 3
  out = np.asarray(fn())
  a, b = (np.asarray(x) for x in fn.args)
  np.testing.assert_allclose(out, a @ b, rtol=1e-4, atol=1e-4)


def test_train_step_updates_parameters_and_keeps_callers_copy():
  model = models.create_model('S_4', 10, **TINY)
  params = models.init_params(model, jax.random.PRNGKey(0), 16)
  params = jax.tree.map(lambda a: a + 0.1, params)
  before = jax.tree.map(np.asarray, params)
  run, compiled, compile_s, state_bytes = benchmark.make_step(
      model, 'train', 'adam', params, 4, 16, 10)
  losses = [float(run()) for _ in range(3)]
  assert compile_s > 0 and compiled.memory_analysis() is not None
  # Parameters plus Adam's two moments (and its step count), float32.
  assert state_bytes == 3 * 4 * models.count_params(params) + 4
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]
  # The caller's parameters survive the donated steps unchanged.
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(before)):
    np.testing.assert_array_equal(x, y)


def test_collective_stats_reads_hlo_lines():
  hlo = '\n'.join([
      '  %a = f32[8,4]{1,0} all-reduce(f32[8,4]{1,0} %x), replica_groups={}',
      '  %b = (f32[16]{0}, bf16[2,2]{1,0}) all-gather-start(%y, %z)',
      '  %c = f32[16]{0} all-gather-done(%b)',
      '  %d = f32[3]{0} add(%e, %f)',
  ])
  assert cost.collective_stats(hlo) == {
      'all-reduce': {'count': 1, 'bytes': 8 * 4 * 4},
      'all-gather': {'count': 1, 'bytes': 16 * 4 + 4 * 2}}


def test_rows_are_consistent_with_their_definitions(monkeypatch):
  # Real steps and matmuls run, but their durations are fixed, so every
  # derived field can be checked exactly against its definition.
  def fixed_timer(fn):
    jax.block_until_ready(fn())
    return 0.25 if isinstance(fn, functools.partial) else 2.0  # Peak: 0.25.
  monkeypatch.setattr(benchmark, '_timed', fixed_timer)
  rows = benchmark.run_benchmark(
      variant='S_4', mode='both', batch_sizes=[2], image_size=16,
      dtype='float32', repeats=3, num_classes=10, peak_size=128, sizes=TINY)
  assert [r['mode'] for r in rows] == ['infer', 'train']
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
    assert r['devices'] == 1 and r['collectives'] == {}
    # One device runs the whole step: the model's matmuls plus LayerNorm,
    # GELU and the update (a large share only at this tiny size).
    assert 1.0 <= r['flops_per_device_fraction'] < 1.5
  table = benchmark.format_table(rows)
  assert benchmark.processor_name() in table
  assert 'img/s' in table and 'of peak' in table and 'FLOPs/dev' in table
  assert len(table.splitlines()) == 1 + 1 + len(rows) + 1


@pytest.mark.parametrize('strategy', ['replicate', 'fsdp'])
def test_scaling_fields_on_eight_devices(strategy):
  kwargs = dict(variant='S_4', batch_size=64, image_size=16, dtype='float32',
                repeats=0, optimizer='adam', num_classes=16, sizes=TINY,
                devices=8, strategy=strategy)
  one = benchmark.benchmark_config(mode='train', **dict(kwargs, devices=1,
                                                        strategy='replicate'))
  row = benchmark.benchmark_config(mode='train', **kwargs)
  assert 'images_per_sec' not in row  # repeats=0: compiled, not run.
  assert row['flops_per_device_fraction'] <= (
      1.05 * one['flops_per_device_fraction'] / 8)
  # Gradients are summed over devices: at least one all-reduce of them.
  assert row['collectives']['all-reduce']['bytes'] >= 4 * 32 * 64
  assert 'all-to-all' not in row['collectives']
  if strategy == 'replicate':
    assert row['state_bytes_per_device'] == one['state_bytes_per_device']
    assert 'all-gather' not in row['collectives']
  else:  # Parameters are gathered layer by layer; state split 8 ways.
    assert row['collectives']['all-gather']['count'] > 0
    assert row['state_bytes_per_device'] <= 1.1 / 8 * one[
        'state_bytes_per_device']


def test_bad_arguments_raise_clear_errors():
  kwargs = dict(variant='S_4', mode='infer', image_size=16, dtype='float32',
                repeats=1, sizes=TINY)
  with pytest.raises(ValueError, match='batch_size'):
    benchmark.benchmark_config(batch_size=0, **kwargs)
  with pytest.raises(ValueError, match='divisible by devices'):
    benchmark.benchmark_config(batch_size=3, devices=2, **kwargs)
  with pytest.raises(ValueError, match='JAX sees only'):
    benchmark.benchmark_devices(64)
  with pytest.raises(ValueError, match='mode'):
    benchmark.run_benchmark(variant='S_4', mode='fast', batch_sizes=[1],
                            image_size=16, dtype='float32', repeats=1)


def _run_cli(*flags):
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop('XLA_FLAGS', None)  # --devices must bring its own fake devices.
  return subprocess.run(
      [sys.executable, '-m', 'mixer_jax.benchmark', *flags],
      cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def test_command_json_output_with_fake_devices():
  result = _run_cli(*TINY_FLAGS, '--mode=train', '--batch_size=4,8',
                    '--optimizer=adam', '--dtype=bfloat16', '--devices=4',
                    '--sharding=fsdp', '--remat', '--json')
  assert result.returncode == 0, result.stderr[-2000:]
  rows = [json.loads(line) for line in result.stdout.splitlines()
          if line.startswith('{')]
  assert [r['batch_size'] for r in rows] == [4, 8]
  for r in rows:
    assert (r['variant'], r['mode'], r['dtype'], r['optimizer'],
            r['devices'], r['sharding'], r['remat']) == (
                'S_4', 'train', 'bfloat16', 'adam', 4, 'fsdp', True)
    for key in ('images_per_sec', 'peak_fraction', 'compile_s',
                'achieved_gflops', 'peak_gflops', 'max_rss_mb',
                'flops_per_device_fraction', 'state_bytes_per_device'):
      assert np.isfinite(r[key]) and r[key] > 0, key
    assert r['collectives']['all-gather']['count'] > 0
    assert r['device'].startswith(benchmark.processor_name())
    assert '4 JAX devices' in r['device']


def test_command_table_and_bad_flag():
  result = _run_cli(*TINY_FLAGS, '--mode=infer', '--batch_size=2')
  assert result.returncode == 0, result.stderr[-2000:]
  assert benchmark.processor_name() in result.stdout
  assert 'img/s' in result.stdout
  bad = _run_cli(*TINY_FLAGS, '--batch_size=two')
  assert bad.returncode != 0 and '--batch_size' in bad.stderr
