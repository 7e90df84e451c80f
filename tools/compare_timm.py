r"""Mixer-B/16 on this machine's CPU: mixer_jax against timm, in one run.

  .venv/bin/python tools/compare_timm.py [--rounds=5] [--breakdown]

Times, interleaved round by round so both see the same load on a shared
machine:
- inference, batch 16, float32: our serve step (`benchmark.make_step`,
  the trainer's builder) against timm's `mixer_b16_224` in eval mode under
  `torch.inference_mode()`;
- a training step, batch 8, SGD: our trainer's own step against timm's
  forward, cross-entropy, backward and `torch.optim.SGD` (momentum 0.9)
  update.
Prints the median images/s of each and the ratio ours/timm.

`--breakdown` also times, in both frameworks, the matmuls alone: every
dense layer of the forward pass at the model's shapes (the stem as the
patch matmul), with nothing between them. The matmuls are over 99% of the
model's arithmetic, so if ours lose to timm's there too, the difference is in
the CPU matmul kernels each library calls, not in how the model is
written.

Without torch or timm it says so and exits 0.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from mixer_jax import benchmark
from mixer_jax import model_from_config
from mixer_jax import models

try:
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
except ImportError:
  timm = torch = None


def _ours(mode: str, batch: int):
  config = benchmark.run_config(
      variant='B_16', num_classes=1000, dtype='float32', sizes={},
      optimizer='sgd', batch_size=batch, image_size=224)
  params = models.init_params(model_from_config.create_model(config, 1000),
                              jax.random.PRNGKey(0), 224)
  run, _, _, _ = benchmark.make_step(config, mode, params)
  return lambda: jax.block_until_ready(run())


def _timm(mode: str, batch: int):
  model = timm.create_model('mixer_b16_224', pretrained=False)
  images = torch.randn(batch, 3, 224, 224)
  if mode == 'infer':
    model.eval()

    def infer():
      with torch.inference_mode():
        return model(images)
    return infer
  model.train()
  labels = torch.randint(0, 1000, (batch,))
  optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
  loss_fn = torch.nn.CrossEntropyLoss()

  def train():
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(images), labels)
    loss.backward()
    optimizer.step()
    return loss
  return train


def _seconds(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def compare(mode: str, batch: int, rounds: int) -> dict:
  ours, theirs = _ours(mode, batch), _timm(mode, batch)
  ours(), theirs()  # Compilation, allocation, thread pools.
  t_ours, t_timm = [], []
  for _ in range(rounds):
    t_ours.append(_seconds(ours))
    t_timm.append(_seconds(theirs))
  return {'mode': mode, 'batch': batch,
          'ours': batch / statistics.median(t_ours),
          'timm': batch / statistics.median(t_timm),
          # Per round, so a load change between rounds cancels out.
          'ratio': statistics.median(
              [b / a for a, b in zip(t_ours, t_timm)])}


def dense_shapes(batch: int):
  """(rows, inputs, outputs) of every matmul of a B/16 forward pass."""
  s, c, ds, dc = 196, 768, 384, 3072
  shapes = [(batch * s, 16 * 16 * 3, c)]  # The stem, as a patch matmul.
  for _ in range(12):
    shapes += [(batch * c, s, ds), (batch * c, ds, s),  # Token mixing.
               (batch * s, c, dc), (batch * s, dc, c)]  # Channel mixing.
  return shapes + [(batch, c, 1000)]


def matmuls_only(batch: int, rounds: int) -> dict:
  """Seconds of the forward pass's matmuls alone, JAX against PyTorch."""
  shapes = dense_shapes(batch)
  rng = np.random.default_rng(0)
  operands = [(rng.standard_normal((m, k), np.float32),
               rng.standard_normal((k, n), np.float32)) for m, k, n in shapes]
  jx = [(jnp.asarray(a), jnp.asarray(b)) for a, b in operands]
  pt = [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in operands]
  # One jitted program of independent matmuls: what XLA's CPU dot kernels
  # do at these shapes, without the model's other ops.
  jax_all = jax.jit(lambda ops: [a @ b for a, b in ops])

  def torch_all():
    with torch.inference_mode():
      return [a @ b for a, b in pt]
  jax.block_until_ready(jax_all(jx)), torch_all()
  t_jax, t_torch = [], []
  for _ in range(rounds):
    t_jax.append(_seconds(lambda: jax.block_until_ready(jax_all(jx))))
    t_torch.append(_seconds(torch_all))
  flops = sum(2 * m * k * n for m, k, n in shapes)
  return {'batch': batch, 'gflop': flops / 1e9,
          'jax_s': statistics.median(t_jax),
          'torch_s': statistics.median(t_torch)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--breakdown', action='store_true')
  args = parser.parse_args()
  if timm is None:
    print('torch and timm are not installed: nothing to compare with.')
    return
  print(f'{benchmark.device_name()}; torch {torch.__version__} with '
        f'{torch.get_num_threads()} threads, timm {timm.__version__}, '
        f'jax {jax.__version__}')
  for mode, batch in (('infer', 16), ('train', 8)):
    r = compare(mode, batch, args.rounds)
    print(f"B/16 {mode:5s} batch {batch:2d} f32: mixer_jax {r['ours']:.2f} "
          f"img/s, timm {r['timm']:.2f} img/s, ours/timm {r['ratio']:.2f}",
          flush=True)
  if args.breakdown:
    for batch in (16, 8):
      r = matmuls_only(batch, args.rounds)
      print(f"forward matmuls alone, batch {batch} ({r['gflop']:.0f} GFLOP): "
            f"XLA {r['jax_s'] * 1e3:.0f} ms ({r['gflop'] / r['jax_s']:.0f} "
            f"GFLOP/s), PyTorch {r['torch_s'] * 1e3:.0f} ms "
            f"({r['gflop'] / r['torch_s']:.0f} GFLOP/s)", flush=True)


if __name__ == '__main__':
  main()
