"""What bounds a run: model FLOP/s, utilisation of the chip, input waits.

Each training log line (and metrics.jsonl) carries, besides images/s:
- `tflops_per_device`: model FLOPs per second per device, counting a
  training image as 3 forward passes (forward, and a backward of twice the
  forward's matmul work; `models.flops_per_image` counts the forward);
- `mfu`: that over the device's published peak for the compute dtype
  (model FLOP utilisation), where the device kind is in `PEAK_TFLOPS`;
  unknown (absent) elsewhere, e.g. on CPUs;
- `input_wait_share`: the share of the interval's wall time the loop spent
  waiting for the next input batch (near 1: the input pipeline is the
  bound; near 0: the device or the host loop is).
"""

import platform
import time
from typing import Dict, Iterable, Iterator, Optional

from mixer_jax import models

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

  The longest table name that starts `device_kind` wins (so 'NVIDIA H100
  PCIe' is not read as an SXM H100).
  """
  matches = [k for k in PEAK_TFLOPS if device_kind.startswith(k)]
  if not matches:
    return None
  bf16, f32 = PEAK_TFLOPS[max(matches, key=len)]
  return bf16 if str(dtype) in ('bfloat16', 'float16') else f32


def train_flops_per_image(model: models.MlpMixer, image_size: int) -> int:
  """Forward FLOPs of one image times 3 (forward + backward)."""
  return 3 * models.flops_per_image(model, image_size)


def speed_metrics(images_per_sec: float, *, flops_per_image: int,
                  num_devices: int, device_kind: str,
                  dtype: str) -> Dict[str, float]:
  """tflops_per_device and, where the peak is known, mfu."""
  tflops = images_per_sec * flops_per_image / num_devices / 1e12
  out = {'tflops_per_device': tflops}
  peak = peak_tflops(device_kind, dtype)
  if peak:
    out['mfu'] = tflops / peak
  return out


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
