"""Tests for mixer_jax.training.throughput: speed, FLOPs, peaks, input waits."""

import time

import pytest

from mixer_jax import models
from mixer_jax.training import throughput


def test_forward_flops_counted_by_hand():
  model = models.create_model('S_4', 10, num_blocks=2, hidden_dim=32,
                              tokens_mlp_dim=16, channels_mlp_dim=64)
  # 16x16 images in 4x4 patches: 16 tokens of width 32. Multiply-adds:
  stem = 16 * (4 * 4 * 3) * 32  # 24,576
  token_mlp = 32 * (16 * 16 + 16 * 16)  # 16,384 per block
  channel_mlp = 16 * (32 * 64 + 64 * 32)  # 65,536 per block
  head = 32 * 10
  macs = stem + 2 * (token_mlp + channel_mlp) + head
  assert macs == 188_736
  assert models.flops_per_image(model, 16) == 2 * macs


def test_published_peaks_and_utilisation():
  # One JAX device of each kind, dense bfloat16 / float32 TFLOP/s.
  assert throughput.peak_tflops('TPU v4', 'bfloat16') == 275
  assert throughput.peak_tflops('TPU v3', 'bfloat16') == 61.5  # Per core.
  assert throughput.peak_tflops('TPU v5 lite', 'bfloat16') == 197
  assert throughput.peak_tflops('NVIDIA H100 80GB HBM3', 'bfloat16') == 989
  assert throughput.peak_tflops('NVIDIA H100 PCIe', 'bfloat16') == 756
  assert throughput.peak_tflops('NVIDIA A100-SXM4-80GB', 'float32') == 19.5
  assert throughput.peak_tflops('TPU v4', 'float32') is None
  assert throughput.peak_tflops('cpu', 'float32') is None
  # 1,000 images/s of 3 GFLOP each on 8 devices: 0.375 TFLOP/s per device.
  progress = throughput.Progress(0, 100, 100, flops_per_image=3 * 10**9,
                                 num_devices=8, peak=275)
  progress._last_time -= 1.0  # pylint: disable=protected-access
  speed = progress.measure(10)
  assert speed['tflops_per_device'] == pytest.approx(0.375, rel=0.01)
  assert speed['mfu'] == pytest.approx(0.375 / 275, rel=0.01)
  assert 'mfu' not in throughput.Progress(
      0, 100, 100, flops_per_image=1).measure(10)


def _share(batches, step_seconds):
  timer = throughput.InputTimer(batches)
  start = time.perf_counter()
  for _ in timer:
    time.sleep(step_seconds)  # The "device step".
  return timer.take_wait() / (time.perf_counter() - start)


def _slow_pipeline(count, seconds):
  for i in range(count):
    time.sleep(seconds)
    yield i


def test_input_wait_share_tells_which_side_is_slow():
  assert _share(_slow_pipeline(5, 0.05), step_seconds=0.0) > 0.8
  assert _share(list(range(5)), step_seconds=0.05) < 0.2
  timer = throughput.InputTimer([1])
  assert list(timer) == [1] and timer.take_wait() >= 0
  assert timer.take_wait() == 0  # Each interval starts from zero.


def test_progress_line_reports_speed_and_eta():
  progress = throughput.Progress(start_step=0, num_train_steps=1000,
                                 batch_size=64)
  progress._last_time -= 10.0  # pylint: disable=protected-access
  speed = progress.measure(100)
  assert abs(speed['steps_per_sec'] - 10.0) < 0.1
  assert abs(speed['images_per_sec'] - 640.0) < 10
  line = progress.line(100, speed, {'loss': 0.25})
  assert line.startswith('step 100/1000 (10.0%) | loss 0.25 | 10.0')
  assert 'img/s' in line and line.endswith('ETA 1m30s')


def test_paused_time_is_not_counted():
  progress = throughput.Progress(0, 10, 1)
  progress.pause()
  progress._pause_start -= 100.0  # pylint: disable=protected-access
  progress.resume()
  # 101 s have passed since the start, 100 of them paused.
  progress._last_time -= 101.0  # pylint: disable=protected-access
  speed = progress.measure(5)
  assert 4.0 < speed['steps_per_sec'] < 5.1  # 5 steps in ~1 s of training.
