"""Training speed: steps/s, images/s, model FLOP/s, MFU and input waits.

The metrics of each log line and what they mean: docs/performance.md.
"""

import math
import platform
import time
from typing import Iterable, Iterator, Mapping, Optional

# Published dense peaks per JAX device, TFLOP/s: (bfloat16, float32). None
# where the maker publishes no such figure. Sources: Google Cloud TPU
# system-architecture pages (per chip; v2/v3 chips are 2 JAX devices, one
# per TensorCore, so half), NVIDIA's A100 and H100/H200 datasheets (dense,
# no sparsity; float32 is the non-tensor-core rate).
PEAK_TFLOPS = {
    'TPU v2': (22.5, None),
    'TPU v3': (61.5, None),
    'TPU v4': (275.0, None),
    'TPU v5 lite': (197.0, None),  # v5e.
    'TPU v5p': (459.0, None),
    'TPU v5': (459.0, None),  # How JAX names a v5p device.
    'TPU v6 lite': (918.0, None),  # v6e (Trillium).
    'NVIDIA A100': (312.0, 19.5),
    'NVIDIA H100 PCIe': (756.0, 51.0),
    'NVIDIA H100': (989.0, 67.0),  # SXM.
    'NVIDIA H200': (989.0, 67.0),
}


def peak_tflops(device_kind: str, dtype: str) -> Optional[float]:
  """The published peak of one device for `dtype` matmuls, or None.

  The longest matching name wins: 'NVIDIA H100 PCIe' is not an SXM H100.
  """
  matches = [k for k in PEAK_TFLOPS if device_kind.startswith(k)]
  if not matches:
    return None
  bf16, f32 = PEAK_TFLOPS[max(matches, key=len)]
  return bf16 if str(dtype) in ('bfloat16', 'float16') else f32


class InputTimer:
  """Wraps a batch iterator and adds up the seconds spent in its next()."""

  def __init__(self, batches: Iterable):
    self._batches = iter(batches)
    self.waited = 0.0

  def __iter__(self) -> Iterator:
    return self

  def __next__(self):
    start = time.perf_counter()
    try:
      return next(self._batches)
    finally:
      self.waited += time.perf_counter() - start

  def take_wait(self) -> float:
    """Seconds waited since the previous call."""
    waited, self.waited = self.waited, 0.0
    return waited


def processor_name() -> str:
  """The CPU model name (lscpu's "Model name"), or the platform's guess."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  hours, rest = divmod(int(round(seconds)), 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f'{hours}h{minutes:02d}m'
  return f'{minutes}m{secs:02d}s' if minutes else f'{secs}s'


class Progress:
  """Training speed between log points and the status line.

  Evaluations and saves are left out (`pause`/`resume`), so steps/s and the
  ETA are of training alone (clu's ReportProgress counts them). A training
  image costs `flops_per_image` (3 forward passes: forward and a backward of
  twice its matmuls); `peak` is `peak_tflops` of the devices, None where
  unknown (no MFU).
  """

  def __init__(self, start_step: int, num_train_steps: int, batch_size: int,
               *, flops_per_image: Optional[int] = None,
               num_devices: int = 1, peak: Optional[float] = None):
    self.num_train_steps = num_train_steps
    self.batch_size = batch_size
    self.flops_per_device = (flops_per_image / num_devices
                             if flops_per_image else None)
    self.peak = peak
    self._last_step = start_step
    self._last_time = time.perf_counter()
    self._paused = 0.0
    self._pause_start: Optional[float] = None

  def restart(self, step: int) -> float:
    """Restarts the clock at `step`; returns seconds since the last start."""
    now = time.perf_counter()
    elapsed = now - self._last_time
    self._last_step, self._last_time, self._paused = step, now, 0.0
    return elapsed

  def pause(self):
    self._pause_start = time.perf_counter()

  def resume(self):
    if self._pause_start is not None:
      self._paused += time.perf_counter() - self._pause_start
      self._pause_start = None

  def measure(self, step: int, input_wait: Optional[float] = None) -> dict:
    """The speed metrics since the previous call (`input_wait`: seconds)."""
    now = time.perf_counter()
    elapsed = max(now - self._last_time - self._paused, 1e-9)
    steps_per_sec = (step - self._last_step) / elapsed
    self._last_step, self._last_time, self._paused = step, now, 0.0
    speed = {'steps_per_sec': steps_per_sec,
             'images_per_sec': steps_per_sec * self.batch_size}
    if self.flops_per_device:
      tflops = speed['images_per_sec'] * self.flops_per_device / 1e12
      speed['tflops_per_device'] = tflops
      if self.peak:
        speed['mfu'] = tflops / self.peak
    if input_wait is not None:
      speed['input_wait_share'] = min(input_wait / elapsed, 1.0)
    return speed

  def line(self, step: int, speed: Mapping[str, float],
           metrics: Mapping[str, float]) -> str:
    steps_per_sec = speed['steps_per_sec']
    eta = ((self.num_train_steps - step) / steps_per_sec
           if steps_per_sec > 0 else float('inf'))
    parts = [f'step {step}/{self.num_train_steps} '
             f'({100.0 * step / self.num_train_steps:.1f}%)']
    parts += [f'{k} {v:.4g}' for k, v in metrics.items()]
    parts += [f'{steps_per_sec:.2f} steps/s',
              f'{speed["images_per_sec"]:.0f} img/s']
    if 'tflops_per_device' in speed:
      parts.append(f'{speed["tflops_per_device"]:.3g} TFLOP/s/device')
    parts.append(f'MFU {100 * speed["mfu"]:.1f}%' if 'mfu' in speed
                 else 'MFU n/a')
    if 'input_wait_share' in speed:
      parts.append(f'input wait {100 * speed["input_wait_share"]:.0f}%')
    parts.append(f'ETA {_format_duration(eta)}')
    return ' | '.join(parts)
