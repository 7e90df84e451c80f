r"""Measures Mixer speed against the machine's own matmul peak.

  python -m mixer_jax.benchmark --variant=B_16 --mode=infer --batch_size=16
  python -m mixer_jax.benchmark --mode=train --batch_size=8 --optimizer=sgd
  python -m mixer_jax.benchmark --mode=compare --batch_size=8,16 --json

Per configuration it reports images/s (median over timed repeats, after
compilation), compile time, the achieved FLOP/s from
`models.flops_per_image` (a training step counts 3x the forward pass), the
fraction of the machine's peak and the memory used. The peak is the FLOP/s of
a large square matmul of the same dtype, timed in the same run and
interleaved with the model's steps (model step, matmuls, model step, ...), so
that both see the same load on a shared machine.

`--mode=compare` runs the straightforward implementation in
`mixer_jax.reference_model` and the package model on the same parameters and
prints the package's speed-up. `--json` prints one JSON object per
configuration (one line each) instead of the table.
"""

import functools
import json
import os
import platform
import resource
import statistics
import time
from typing import Any, Callable, Optional, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mixer_jax import models
from mixer_jax import reference_model

MODES = ('infer', 'train')
IMPLS = ('package', 'reference')
SIZE_FLAGS = ('num_blocks', 'hidden_dim', 'tokens_mlp_dim',
              'channels_mlp_dim')


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


def device_name() -> str:
  """What runs the computation: the CPU model, or the accelerator's kind."""
  device = jax.devices()[0]
  if device.platform == 'cpu':
    return (f'{processor_name()} ({jax.local_device_count()} JAX devices, '
            f'{len(os.sched_getaffinity(0))} cores)')
  return device.device_kind


def _timed(fn: Callable[[], Any]) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def make_peak_fn(size: int, dtype: Any) -> tuple[Callable[[], Any], float]:
  """A compiled `size`x`size` matmul of `dtype` and its FLOP count."""
  key_a, key_b = jax.random.split(jax.random.PRNGKey(1))
  a = jax.random.normal(key_a, (size, size), dtype)
  b = jax.random.normal(key_b, (size, size), dtype)
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, b))
  return functools.partial(matmul, a, b), 2.0 * size ** 3


def build_model(impl: str, variant: str, num_classes: int, dtype: str,
                sizes: dict[str, Optional[int]]):
  """The package model or the reference model with the given sizes."""
  sizes = {k: v for k, v in sizes.items() if v is not None}
  if impl == 'package':
    return models.create_model(variant, num_classes, dtype=dtype, **sizes)
  if impl == 'reference':
    return reference_model.create_reference_model(
        variant, num_classes, dtype=dtype, **sizes)
  raise ValueError(f'Unknown implementation {impl!r}; use one of {IMPLS}.')


def make_step(model, mode: str, optimizer: str, params, batch_size: int,
              image_size: int, num_classes: int):
  """Compiles one inference or training step and returns a runner for it.

  Returns:
    (run, compile_seconds, memory): `run()` performs one step and returns its
    output (the state is carried inside, donated from step to step in
    training); `memory` is XLA's compile-time memory analysis in bytes.
  """
  rng = jax.random.PRNGKey(2)
  images = jax.random.uniform(rng, (batch_size, image_size, image_size, 3),
                              jnp.float32, -1.0, 1.0)
  if mode == 'infer':
    fn = jax.jit(lambda p, x: model.apply({'params': p}, x))
    args = (params, images)
  elif mode == 'train':
    tx = optax.sgd(0.01, momentum=0.9) if optimizer == 'sgd' else optax.adam(
        1e-3)
    labels = jax.nn.one_hot(
        jax.random.randint(rng, (batch_size,), 0, max(num_classes, 1)),
        max(num_classes, 1))

    def train_step(state, x, y):
      p, opt_state = state

      def loss_fn(p):
        out = model.apply({'params': p}, x, train=True)
        if not num_classes:  # Features only: any scalar exercises backprop.
          return jnp.mean(out ** 2)
        return optax.softmax_cross_entropy(out, y).mean()

      loss, grads = jax.value_and_grad(loss_fn)(p)
      updates, opt_state = tx.update(grads, opt_state, p)
      return (optax.apply_updates(p, updates), opt_state), loss

    fn = jax.jit(train_step, donate_argnums=0)
    params = jax.tree.map(jnp.copy, params)  # Donated: keep caller's intact.
    args = ((params, tx.init(params)), images, labels)
  else:
    raise ValueError(f'Unknown mode {mode!r}; use one of {MODES}.')
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  mem = None
  if memory is not None:
    mem = (memory.argument_size_in_bytes + memory.output_size_in_bytes +
           memory.temp_size_in_bytes - memory.alias_size_in_bytes)

  if mode == 'infer':
    return (lambda: compiled(*args)), compile_s, mem
  carry = {'state': args[0]}

  def run():
    carry['state'], loss = compiled(carry['state'], *args[1:])
    return loss
  return run, compile_s, mem


def benchmark_configs(*, impls: Sequence[str], variant: str, mode: str,
                      batch_size: int, image_size: int, dtype: str,
                      repeats: int, optimizer: str = 'sgd',
                      num_classes: int = 1000, peak_size: int = 2048,
                      params=None,
                      sizes: Optional[dict[str, Optional[int]]] = None
                      ) -> list[dict[str, Any]]:
  """Times one configuration for each implementation; one row per impl.

  The implementations and the peak matmul are timed interleaved (impl A
  step, impl B step, matmuls, impl B step, impl A step, ...), so on a shared machine they
  all see the same varying load and their ratios stay meaningful. Each
  round's peak is the faster of two timed matmuls (after an untimed one);
  `peak_fraction` is the median over rounds of step rate / that round's peak,
  `peak_gflops` the median of the rounds' peaks.

  Args:
    impls: 'package' (mixer_jax.models) and/or 'reference'.
    variant, mode, batch_size, image_size, dtype, optimizer, num_classes:
      what to run (mode 'infer' or 'train').
    repeats: timed steps per implementation.
    peak_size: side of the square matmul that defines the peak.
    params: float32 parameters to use (initialised when None).
    sizes: model size overrides (`num_blocks`, ...).

  Returns:
    JSON-serialisable dicts, one per implementation.
  """
  if batch_size <= 0 or repeats <= 0:
    raise ValueError(f'batch_size={batch_size} and repeats={repeats} must be '
                     'positive.')
  built = []
  for impl in impls:
    model = build_model(impl, variant, num_classes, dtype, sizes or {})
    if params is None:
      params = models.init_params(model, jax.random.PRNGKey(0), image_size)
    run, compile_s, mem = make_step(model, mode, optimizer, params,
                                    batch_size, image_size, num_classes)
    _timed(run)  # First execution: allocation and thread-pool warm-up.
    built.append((impl, model, run, compile_s, mem))
  peak_fn, peak_flops = make_peak_fn(peak_size, jnp.dtype(dtype))
  times = {impl: [] for impl in impls}
  cpu_times = {impl: [] for impl in impls}
  peaks, peaks_cpu = [], []  # One peak rate per round, FLOP/s.
  for i in range(repeats):
    # Alternate the order so that neither implementation always runs just
    # after the matmuls (or just after the other one).
    for impl, _, run, _, _ in (built if i % 2 == 0 else built[::-1]):
      cpu = time.process_time()
      times[impl].append(_timed(run))
      cpu_times[impl].append(time.process_time() - cpu)
    # The first matmul after a model step runs cold (its operands were
    # evicted from the caches, its output pages are fresh), typically 10-30%
    # below the steady rate a peak should describe: it is not timed.
    _timed(peak_fn)
    wall, cpu_s = [], []
    for _ in range(2):
      cpu = time.process_time()
      wall.append(_timed(peak_fn))
      cpu_s.append(time.process_time() - cpu)
    peaks.append(peak_flops / min(wall))
    peaks_cpu.append(peak_flops / min(cpu_s))
  rows = []
  for impl, model, _, compile_s, mem in built:
    step_s = statistics.median(times[impl])
    flops = models.flops_per_image(model, image_size) * (
        3 if mode == 'train' else 1) * batch_size
    # Each step is compared with the peak of its own round, so a change of
    # load on a shared machine between rounds cancels out of the fraction.
    fractions = [flops / t / p for t, p in zip(times[impl], peaks)]
    fractions_cpu = [flops / t / p for t, p in zip(cpu_times[impl],
                                                   peaks_cpu)]
    rows.append({
        'variant': variant, 'mode': mode, 'impl': impl,
        'batch_size': batch_size, 'image_size': image_size, 'dtype': dtype,
        'optimizer': optimizer if mode == 'train' else None,
        'images_per_sec': batch_size / step_s,
        'images_per_sec_best': batch_size / min(times[impl]),
        'step_time_s': step_s,
        'step_time_spread': (max(times[impl]) - min(times[impl])) / step_s,
        'compile_s': compile_s,
        'gflop_per_image': flops / batch_size / 1e9,
        'achieved_gflops': flops / step_s / 1e9,
        'peak_gflops': statistics.median(peaks) / 1e9,
        'peak_fraction': statistics.median(fractions),
        # The same ratio in FLOPs per CPU-second of this process: less
        # sensitive to other processes taking the cores for a while.
        'peak_fraction_cpu_time': statistics.median(fractions_cpu),
        'compiled_memory_mb': None if mem is None else mem / 2 ** 20,
        # ru_maxrss is in KiB on Linux; it is the process maximum so far.
        'max_rss_mb': resource.getrusage(
            resource.RUSAGE_SELF).ru_maxrss / 1024,
        'device': device_name(),
    })
  return rows


def add_ratios(rows: Sequence[dict[str, Any]]) -> None:
  """Adds `speedup_vs_reference` to package rows with a reference twin."""
  ref = {(r['mode'], r['batch_size']): r for r in rows
         if r['impl'] == 'reference'}
  for row in rows:
    twin = ref.get((row['mode'], row['batch_size']))
    if row['impl'] == 'package' and twin is not None:
      row['speedup_vs_reference'] = (row['images_per_sec'] /
                                     twin['images_per_sec'])
      row['peak_fraction_vs_reference'] = (row['peak_fraction'] /
                                           twin['peak_fraction'])


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  """A fixed-width table of the rows, headed by the device name."""
  cols = [('impl', '{}'), ('mode', '{}'), ('batch', '{}'), ('img/s', '{:.2f}'),
          ('step s', '{:.4g}'), ('spread', '{:.0%}'), ('compile s', '{:.1f}'),
          ('GFLOP/s', '{:.1f}'), ('peak GFLOP/s', '{:.1f}'),
          ('of peak', '{:.1%}'), ('(cpu s)', '{:.1%}'), ('XLA MiB', '{:.1f}'),
          ('RSS MiB', '{:.0f}'),
          ('vs ref', '{:.2f}x')]
  keys = ['impl', 'mode', 'batch_size', 'images_per_sec', 'step_time_s',
          'step_time_spread', 'compile_s', 'achieved_gflops', 'peak_gflops',
          'peak_fraction', 'peak_fraction_cpu_time', 'compiled_memory_mb',
          'max_rss_mb',
          'speedup_vs_reference']
  body = [[fmt.format(r[k]) if r.get(k) is not None else '-'
           for (_, fmt), k in zip(cols, keys)] for r in rows]
  widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
            for i, (h, _) in enumerate(cols)]
  lines = []
  if rows:
    r = rows[0]
    lines.append(f"Mixer-{r['variant']} {r['image_size']}x{r['image_size']} "
                 f"{r['dtype']} on {r['device']}")
  lines.append('  '.join(h.rjust(w) for (h, _), w in zip(cols, widths)))
  lines.extend('  '.join(c.rjust(w) for c, w in zip(b, widths)) for b in body)
  lines.append('Median of repeats. Training counts 3x the forward FLOPs; '
               '"of peak" divides by a square matmul of the same dtype timed '
               'between the steps; "(cpu s)" is the same ratio per CPU-second '
               'of this process.')
  return '\n'.join(lines)


def run_benchmark(*, variant: str, mode: str, batch_sizes: Sequence[int],
                  **kwargs) -> list[dict[str, Any]]:
  """Runs every configuration of one command; 'compare' runs both impls.

  Args:
    variant: model variant.
    mode: 'infer', 'train' or 'compare' (both modes, both implementations).
    batch_sizes: batch sizes to run.
    **kwargs: passed to `benchmark_configs` (image_size, dtype, repeats, ...).

  Returns:
    One dict per configuration, package rows carrying the speed-up over the
    reference when both ran.
  """
  if mode not in MODES + ('compare',):
    raise ValueError(f'Unknown mode {mode!r}; use infer, train or compare.')
  modes = MODES if mode == 'compare' else (mode,)
  impls = IMPLS[::-1] if mode == 'compare' else ('package',)
  rows = []
  model = build_model('package', variant, kwargs.get('num_classes', 1000),
                      kwargs['dtype'], kwargs.get('sizes') or {})
  # The same parameters for every configuration and implementation.
  params = models.init_params(model, jax.random.PRNGKey(0),
                              kwargs['image_size'])
  for batch_size in batch_sizes:
    for m in modes:
      rows.extend(benchmark_configs(impls=impls, variant=variant, mode=m,
                                    batch_size=batch_size, params=params,
                                    **kwargs))
  add_ratios(rows)
  return rows


def define_flags() -> None:
  """Defines the command's flags (only when run as a command, so importing
  this module next to other commands never redefines a flag)."""
  flags.DEFINE_string('variant', 'B_16', 'Mixer variant, e.g. B_16.')
  flags.DEFINE_enum('mode', 'infer', ('infer', 'train', 'compare'),
                    'infer: forward pass; train: forward + backward + '
                    'optimizer update; compare: both modes for the '
                    'reference and the package implementation.')
  flags.DEFINE_list('batch_size', ['16'], 'Batch size(s), comma separated.')
  flags.DEFINE_integer('image_size', 224, 'Square image side.')
  flags.DEFINE_enum('dtype', 'float32', ('float32', 'bfloat16'),
                    'Computation dtype of the model and the peak matmul.')
  flags.DEFINE_integer('repeats', 5, 'Timed steps per configuration.')
  flags.DEFINE_enum('optimizer', 'sgd', ('sgd', 'adam'),
                    'Optimizer of the training step.')
  flags.DEFINE_integer('num_classes', 1000, 'Head size.')
  flags.DEFINE_integer('peak_size', 2048,
                       'Side of the square matmul giving the peak.')
  flags.DEFINE_bool('json', False, 'One JSON object per line, no table.')
  for name in SIZE_FLAGS:
    flags.DEFINE_integer(name, None, f'Override the variant\'s {name}.')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  try:
    batch_sizes = [int(b) for b in f.batch_size]
  except ValueError as e:
    raise app.UsageError(f'--batch_size must be integers, e.g. 8,16: {e}')
  rows = run_benchmark(
      variant=f.variant, mode=f.mode, batch_sizes=batch_sizes,
      image_size=f.image_size, dtype=f.dtype, repeats=f.repeats,
      optimizer=f.optimizer, num_classes=f.num_classes,
      peak_size=f.peak_size, sizes={k: f[k].value for k in SIZE_FLAGS})
  if f.json:
    for row in rows:
      print(json.dumps(row), flush=True)
  else:
    print(format_table(rows), flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(main)
