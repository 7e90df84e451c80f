"""Tests of `python -m mixer_jax.benchmark` on a tiny Mixer.

The step it times must be the trainer's: one step of each from the same
state and batch gives the same parameters, and the executables are the
same program. FLOPs are checked against a count by hand, the scaling
fields against the mesh (1/N of the FLOPs, 1/N of the state under fsdp).
"""

import functools
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixer_jax import benchmark
from mixer_jax import model_from_config
from mixer_jax import models
from mixer_jax.training import compiled
from mixer_jax.training import cost
from mixer_jax.training import compiled
from mixer_jax.training import optim
from mixer_jax.training import throughput
from mixer_jax.training import sharding

TINY = dict(num_blocks=2, hidden_dim=32, tokens_mlp_dim=16,
            channels_mlp_dim=64)
TINY_FLAGS = ['--variant=S_4', '--image_size=16', '--num_classes=16',
              '--num_blocks=2', '--hidden_dim=32', '--tokens_mlp_dim=16',
              '--channels_mlp_dim=64', '--peak_size=128', '--repeats=2']
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Mixer S_4 at 16x16 with TINY sizes and 16 classes, counted by hand (2 FLOPs
# per multiply-add): S = (16/4)^2 = 16 tokens of C = 32 channels.
#   stem     16 tokens x (4*4*3 = 48) inputs x 32           =  24,576 MACs
#   token    32 channels x (16x16 + 16x16)         per block =  16,384 MACs
#   channel  16 tokens x (32x64 + 64x32)           per block =  65,536 MACs
#   head     32 x 16                                         =     512 MACs
HAND_FLOPS = 2 * (24_576 + 2 * (16_384 + 65_536) + 512)  # 377,856.


def _program(executable):
  """Optimized HLO without source locations (which name the caller)."""
  text = executable.as_text().split('\nFileNames')[0]
  return re.sub(r',? metadata=\{[^}]*\}', '', text)


def tiny_config(**overrides):
  fields = dict(model__variant='S_4', num_classes=16, optimizer='adam',
                batch_size=8, image_size=16,
                **{f'model__{k}': v for k, v in TINY.items()})
  return benchmark.with_fields(None, **dict(fields, **overrides))


def test_peak_matmul_is_a_real_matmul():
  fn, flops = benchmark.make_peak_fn(64, jnp.float32)
  assert flops == 2 * 64 ** 3
  out = np.asarray(fn())
  a, b = (np.asarray(x) for x in fn.args)
  np.testing.assert_allclose(out, a @ b, rtol=1e-4, atol=1e-4)


def test_the_benchmark_step_is_the_trainers():
  config = tiny_config(sharding='fsdp')
  config.fsdp_min_size_mb = 0.0
  devices = jax.devices()[:2]
  model = model_from_config.create_model(config, config.num_classes)
  params = models.init_params(model, jax.random.PRNGKey(5), 16)
  params = jax.tree.map(lambda a: a + 0.1, params)
  before = jax.tree.map(np.asarray, params)
  run, executable, compile_s, state_bytes = benchmark.make_step(
      config, 'train', params, devices)
  losses = [float(run()) for _ in range(3)]
  assert compile_s > 0 and losses[-1] < losses[0]
  # The trainer's step from the same state and batch (the benchmark's batch
  # is drawn from PRNGKey(2), its state initialised from PRNGKey(0)).
  mesh = sharding.create_mesh(devices)
  num_steps = config.warmup_steps + 1000
  steps = compiled.build(
      config, model, mesh, tx=optim.create_optimizer(config, num_steps),
      num_train_steps=num_steps)
  state = steps.init_fn(jax.random.PRNGKey(0))
  state = state.replace(params=sharding.put(before, steps.params_sharding))
  assert state_bytes == cost.state_bytes_per_device(state)
  rng = jax.random.PRNGKey(2)
  batch = sharding.shard_batch({
      'image': jax.random.uniform(rng, (8, 16, 16, 3), jnp.float32, -1, 1),
      'label': jax.nn.one_hot(jax.random.randint(rng, (8,), 0, 16), 16)},
                               mesh)
  # The same program (a step of its own, other shardings or no donation
  # would compile to other HLO)...
  trainer_exe = steps.train_step.lower(state, batch).compile()
  assert _program(executable) == _program(trainer_exe)
  # ...and the same updates: each loss depends on the previous updates.
  trainer_losses = []
  for _ in range(3):
    state, metrics = trainer_exe(state, batch)
    trainer_losses.append(float(metrics['loss']))
  np.testing.assert_allclose(losses, trainer_losses, rtol=1e-6)
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


def test_flops_and_peak_fraction_per_device(monkeypatch):
  # Real steps and matmuls run, but the clock is fixed (a step 2 s, a peak
  # matmul 0.25 s), so the rates follow from the hand count alone.
  def fixed_timer(fn):
    jax.block_until_ready(fn())
    return 0.25 if isinstance(fn, functools.partial) else 2.0
  monkeypatch.setattr(benchmark, '_timed', fixed_timer)
  rows = [benchmark.benchmark_config(tiny_config(batch_size=4), mode,
                                     repeats=2, peak_size=128, devices=2)
          for mode in ('infer', 'train')]
  assert [r['mode'] for r in rows] == ['infer', 'train']
  peak = 2 * 128 ** 3 / 0.25  # FLOP/s of one device.
  for r, factor in zip(rows, (1, 3)):  # Training: forward + 2x backward.
    step_flops = HAND_FLOPS * factor * 4
    assert r['gflop_per_image'] == pytest.approx(HAND_FLOPS * factor / 1e9)
    assert r['images_per_sec'] == pytest.approx(4 / 2.0)
    assert r['peak_gflops'] == pytest.approx(peak / 1e9)
    # Each of the 2 devices runs half of the step in the 2 s.
    assert r['peak_fraction'] == pytest.approx(step_flops / 2 / 2.0 / peak)
    assert r['max_rss_mb'] > 10 and r['compiled_memory_mb'] > 0
    # XLA's count of one device: half the matrix products, plus LayerNorm,
    # GELU and the update (a large share only at this tiny size).
    assert 0.5 <= r['flops_per_device_fraction'] < 0.75
  table = benchmark.format_table(rows)
  assert throughput.processor_name() in table
  assert len(table.splitlines()) == 1 + 1 + len(rows) + 1


@pytest.mark.parametrize('strategy', ['replicate', 'fsdp'])
def test_scaling_fields_on_eight_devices(strategy):
  # fsdp_min_size_mb=0: split even this tiny model's arrays.
  config = tiny_config(batch_size=64, fsdp_min_size_mb=0.0)
  one = benchmark.benchmark_config(config, 'train', repeats=0, devices=1)
  row = benchmark.benchmark_config(
      benchmark.with_fields(config, sharding=strategy), 'train', repeats=0,
      devices=8)
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
  with pytest.raises(ValueError, match='batch_size'):
    benchmark.benchmark_config(tiny_config(batch_size=0), 'infer', repeats=1)
  with pytest.raises(ValueError, match='divisible by devices'):
    benchmark.benchmark_config(tiny_config(batch_size=3), 'infer', repeats=1,
                               devices=2)
  with pytest.raises(ValueError, match='JAX sees only'):
    benchmark.benchmark_config(tiny_config(batch_size=64), 'infer',
                               repeats=1, devices=64)


def _run_cli(*flags):
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop('XLA_FLAGS', None)  # --devices must bring its own fake devices.
  return subprocess.run(
      [sys.executable, '-m', 'mixer_jax.benchmark', *flags],
      cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def test_command_json_output_with_fake_devices():
  result = _run_cli(*TINY_FLAGS, '--mode=train', '--batch_size=4,8',
                    '--optimizer=adam', '--dtype=bfloat16', '--devices=4',
                    '--sharding=fsdp', '--remat', '--json',
                    '--config=mixer_jax/config_defaults.py',
                    '--config.fsdp_min_size_mb=0')
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
    assert r['device'].startswith(throughput.processor_name())
    assert '4 JAX devices' in r['device']


def test_command_table_and_bad_flag():
  result = _run_cli(*TINY_FLAGS, '--mode=infer', '--batch_size=2')
  assert result.returncode == 0, result.stderr[-2000:]
  assert throughput.processor_name() in result.stdout
  assert 'img/s' in result.stdout
  bad = _run_cli(*TINY_FLAGS, '--batch_size=two')
  assert bad.returncode != 0 and '--batch_size' in bad.stderr


def test_loop_mode_runs_the_trainer_and_its_step(tmp_path):
  # The quick-start loop for a few steps against the same step back to
  # back: both rates and their ratio, and the run's input wait share.
  result = _run_cli('--mode=loop', '--loop_steps=12', '--repeats=1',
                    '--json', '--config=configs/quickstart.py',
                    f'--config.data_dir={tmp_path}',
                    '--config.model.num_blocks=1')
  assert result.returncode == 0, result.stderr[-2000:]
  row = json.loads([line for line in result.stdout.splitlines()
                    if line.startswith('{')][-1])
  assert (row['mode'], row['dataset'], row['steps'], row['rounds']) == (
      'loop', 'digits', 12, 1)
  assert row['loop_steps_per_sec'] > 0 and row['step_steps_per_sec'] > 0
  assert row['loop_to_step'] == pytest.approx(
      row['loop_steps_per_sec'] / row['step_steps_per_sec'])
  assert 0 <= row['input_wait_share'] <= 1
  assert row['device'].startswith(throughput.processor_name())
  table = _run_cli('--mode=loop', '--loop_steps=3', '--repeats=1')
  assert table.returncode != 0 and '--loop_steps' in table.stderr


def test_input_mode_times_the_jpeg_pipeline(tmp_path):
  size = benchmark.make_jpegs(str(tmp_path), 8, 64, 48, num_classes=2)
  assert size > 500  # Bytes per JPEG: real, noisy content.
  config = benchmark.input_config(None, 'finetune', str(tmp_path), 32, 4)
  from mixer_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  assert input_pipeline.dataset_info(config).train_examples == 8
  rate, per_cpu_second = benchmark.input_images_per_second(
      config, num_batches=2, warmup_batches=1)
  assert rate > 0 and per_cpu_second > 0


def _figures(line):
  """images/s, per core, per CPU-second of one --mode=input line."""
  return [float(v) for v in re.findall(r'([\d.]+) (?:images/s|per)', line)]


@pytest.mark.parametrize('with_timm', [
    False,
    pytest.param(True, marks=pytest.mark.skipif(
        benchmark.timm_missing() is not None,
        reason='torch, torchvision and timm not installed'))])
def test_input_mode_per_core_and_timm(tmp_path, with_timm):
  benchmark.make_jpegs(str(tmp_path), 8, 64, 48, num_classes=2)
  rows = benchmark.benchmark_input(
      recipes=['inception'], folder=str(tmp_path), image_size=32,
      batch_size=4, repeats=2, num_batches=2, warmup_batches=1,
      compare_timm=with_timm)
  assert [r['loader'] for r in rows] == (
      ['mixer_jax', 'timm'] * 2 if with_timm else ['mixer_jax'] * 2)
  lines = benchmark.format_input(rows).splitlines()
  assert throughput.processor_name() in lines[0]
  for r, line in zip(rows, lines[1:]):
    assert r['loader'] in line
    # Printed to one decimal: images/s, images/s / cores, per CPU-second.
    np.testing.assert_allclose(
        _figures(line), [r['images_per_sec'], r['images_per_sec'] /
                         benchmark.cores(), r['per_cpu_second']], atol=0.051)
    assert r['images_per_sec'] > 0 and r['per_cpu_second'] > 0
  assert any('medians' in l for l in lines) == with_timm


def test_input_mode_command(tmp_path):
  result = _run_cli('--mode=input', '--recipe=finetune', '--num_images=8',
                    '--width=64', '--height=48', '--image_size=32',
                    '--batch_size=4', '--num_batches=2', '--warmup_batches=1',
                    '--repeats=1', '--compare_timm', f'--data={tmp_path}')
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'Made 8 JPEGs' in result.stdout and 'per CPU-second' in result.stdout
  if benchmark.timm_missing():
    assert 'timm comparison skipped' in result.stdout
