r"""Measures Mixer speed against the machine's own matmul peak, and how a
step's work, communication and state split over N devices.

  python -m mixer_jax.benchmark --variant=B_16 --mode=infer --batch_size=16
  python -m mixer_jax.benchmark --mode=train --batch_size=8 --optimizer=sgd
  python -m mixer_jax.benchmark --variant=L_16 --mode=train --devices=8 \
      --sharding=fsdp --remat --batch_size=64 --optimizer=adam --repeats=0
  python -m mixer_jax.benchmark --mode=loop  # quick-start loop vs its step

The step timed is the trainer's own: `compiled.build` (the builder
`python -m mixer_jax.train` uses) makes it from a training config, with the
same shardings and donation. The config is `--config` (default the
package's defaults, mixer_jax/config_defaults.py: the ImageNet recipe's loss, mixup,
clipping and weight decay); the flags set its model, batch, image size,
optimizer and sharding.

Per configuration it reports images/s (median over timed repeats, after
compilation), compile time, the achieved FLOP/s from
`models.flops_per_image` (a training step counts 3x the forward pass), the
fraction of one device's peak that each device reaches (the step's FLOPs /
devices / step time / peak) and the memory used. The peak is the FLOP/s of
a large square matmul of the same dtype on one device, timed in the same
run and interleaved with the model's steps, so that both see the same load
on a shared machine.

The step runs on `--devices` devices (fake CPU devices when the machine has
fewer real ones; the mesh of the config's `mesh`), batch split over it,
parameters and optimizer state placed by `--sharding` as in training. Read
from the
compiled executable, every row also has `flops_per_device_fraction`
(compiled FLOPs of one device over the model FLOPs of the whole step: 1/N
is a perfect split, remat adds about a third in training), `collectives`
(count and result bytes per kind in the optimized HLO) and
`state_bytes_per_device` (parameters, plus optimizer state in training).
`--repeats=0` compiles and reports these without running (large variants
on a CPU). `--json` prints one JSON object per configuration.

`--mode=loop` measures the training loop instead (`benchmark_loop`): the
steps/s of `train_and_evaluate` on `--config` (default
configs/quickstart.py) against the same train step called back to back on
one placed batch, in the same process, and their ratio: what the loop's
host work (input, transfers, bookkeeping, logging) costs.
"""

# First, before TensorFlow loads: it quiets TensorFlow's C++ start-up lines.
from mixer_jax.training import command_line  # pylint: disable=g-bad-import-order

import functools
import json
import os
import resource
import statistics
import time
from typing import Any, Callable, Optional, Sequence

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import jax.numpy as jnp
import numpy as np

from mixer_jax import config_defaults
from mixer_jax import model_from_config
from mixer_jax import models
from mixer_jax.training import compiled
from mixer_jax.training import cost
from mixer_jax.training import errors
from mixer_jax.training import optim
from mixer_jax.training import sharding
from mixer_jax.training import throughput

MODES = ('infer', 'train')
SIZE_FLAGS = ('num_blocks', 'hidden_dim', 'tokens_mlp_dim',
              'channels_mlp_dim')


def device_name(device=None) -> str:
  """What runs the computation: the CPU model, or the accelerator's kind."""
  device = device or jax.devices()[0]
  if device.platform == 'cpu':
    return (f'{throughput.processor_name()} ({len(jax.devices("cpu"))} JAX devices, '
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


def run_config(base=None, *, variant: str, num_classes: int, dtype: str,
               sizes: dict[str, Optional[int]], remat: bool = False,
               optimizer: str = 'sgd', batch_size: int, image_size: int,
               strategy: str = 'replicate'):
  """The training config whose step is timed: `base` with the flags' fields.

  Args:
    base: a ConfigDict (e.g. `--config`); default the package's defaults
      (mixer_jax/config_defaults.py). Its loss, mixup, clipping, weight decay,
      accumulation, momentum dtype, fsdp threshold and mesh are kept.
    variant, num_classes, dtype, sizes, remat, optimizer, batch_size,
      image_size, strategy: set on the copy.
  """
  if base is None:
    base = config_defaults.get_config()
  config = base.copy_and_resolve_references()
  config.unlock()
  config.model.variant, config.model.dtype = variant, dtype
  config.model.remat = remat
  for key, value in sizes.items():
    if value is not None:
      config.model[key] = value
  config.num_classes = num_classes
  config.optimizer, config.batch_size = optimizer, batch_size
  config.image_size, config.sharding = image_size, strategy
  return config


def build_model(config):
  """The package model of `config` (`model_from_config.create_model`)."""
  return model_from_config.create_model(config, config.num_classes)


def benchmark_devices(count: int) -> list:
  """`count` devices: real ones when there are enough, else CPU devices.

  Fake CPU devices exist only if `jax_num_cpu_devices` (or XLA_FLAGS) was
  set before JAX started; `main` does that for `--devices`.
  """
  devices = jax.devices()
  if len(devices) < count:
    devices = jax.devices('cpu')
  if len(devices) < count:
    raise errors.UsageError(
        f'--devices={count}, but JAX sees only {len(devices)} device(s); run '
        'as a command (it sets jax_num_cpu_devices) or set XLA_FLAGS='
        f'--xla_force_host_platform_device_count={count}.')
  return devices[:count]


def make_step(config, mode: str, params=None,
              devices: Optional[Sequence[Any]] = None):
  """Compiles the run's own train step (or forward pass) over `devices`.

  The functions come from `compiled.build`, the trainer's builder: the same
  train step, shardings (`config.sharding`, `config.mesh`) and donation as
  `python -m mixer_jax.train` with this config. The default mesh is the
  first device alone.

  Args:
    config: the run's config (`run_config`).
    mode: 'train' or 'infer'.
    params: float32 parameters to start from (default: initialised).
    devices: the mesh's devices.

  Returns:
    (run, compiled, compile_seconds, state_bytes): `run()` performs one step
    and returns its output (the state is carried inside, donated from step
    to step in training); `compiled` is the executable.
  """
  if mode not in MODES:
    raise errors.UsageError(f'Unknown mode {mode!r}; use one of {MODES}.')
  mesh = sharding.create_mesh(devices or jax.devices()[:1], axes=config.mesh)
  model = build_model(config)
  rng = jax.random.PRNGKey(2)
  images = jax.random.uniform(
      rng, (config.batch_size, config.image_size, config.image_size, 3),
      jnp.float32, -1.0, 1.0)
  if mode == 'infer':
    functions = compiled.build(config, model, mesh)
    if params is None:
      params = models.init_params(model, jax.random.PRNGKey(0),
                                  config.image_size)
    args = (sharding.put(params, functions.params_sharding),
            sharding.shard_batch(images, mesh))
    fn = functions.serve_step
  else:
    if not config.num_classes or config.num_classes < 0:
      raise errors.UsageError('--mode=train needs a head: set --num_classes > 0.')
    # The schedule's length only sets learning-rate values, not the work.
    num_steps = config.warmup_steps + 1000
    functions = compiled.build(
        config, model, mesh, tx=optim.create_optimizer(config, num_steps),
        num_train_steps=num_steps)
    state = functions.init_fn(jax.random.PRNGKey(0))
    if params is not None:  # A placed copy: the steps donate the state.
      state = state.replace(params=sharding.put(params,
                                                functions.params_sharding))
    labels = jax.nn.one_hot(jax.random.randint(
        rng, (config.batch_size,), 0, config.num_classes), config.num_classes)
    args = (state, sharding.shard_batch({'image': images, 'label': labels},
                                        mesh))
    fn = functions.train_step
  start = time.perf_counter()
  executable = fn.lower(*args).compile()
  compile_s = time.perf_counter() - start
  state_bytes = cost.state_bytes_per_device(args[0])

  if mode == 'infer':
    return (lambda: executable(*args)), executable, compile_s, state_bytes
  carry = {'state': args[0]}

  def run():
    carry['state'], metrics = executable(carry['state'], args[1])
    return metrics['loss']
  return run, executable, compile_s, state_bytes


def benchmark_config(*, variant: str, mode: str, batch_size: int,
                     image_size: int, dtype: str, repeats: int,
                     optimizer: str = 'sgd', num_classes: int = 1000,
                     peak_size: int = 2048, params=None,
                     sizes: Optional[dict[str, Optional[int]]] = None,
                     devices: int = 1, strategy: str = 'replicate',
                     remat: bool = False, base_config=None) -> dict[str, Any]:
  """Compiles and times one configuration; returns its row.

  Model steps and the peak matmul are timed interleaved (step, matmuls,
  step, ...), so on a shared machine both see the same varying load. Each
  round's peak is the faster of two timed matmuls (after an untimed one);
  `peak_fraction` is the median over rounds of the FLOP/s of one device
  (the step's FLOPs / devices / step time) over that round's peak (one
  device's: the matmul runs on one device), `peak_gflops` the median of
  the rounds' peaks.

  Args:
    variant, mode, batch_size, image_size, dtype, optimizer, num_classes:
      what to run (mode 'infer' or 'train').
    repeats: timed steps; 0 compiles only (no timing fields).
    peak_size: side of the square matmul that defines the peak.
    params: float32 parameters to use (initialised when None).
    sizes: model size overrides (`num_blocks`, ...).
    devices: mesh size; the batch is split over it.
    strategy: 'replicate' or 'fsdp' placement of parameters and state.
    remat: rematerialise each block in the backward pass.
    base_config: the training config the rest comes from (`run_config`).

  Returns:
    A JSON-serialisable dict.
  """
  if batch_size <= 0 or repeats < 0 or devices <= 0:
    raise errors.UsageError(f'batch_size={batch_size}, repeats={repeats} and '
                            f'devices={devices} must be positive (repeats '
                            '>= 0).')
  if batch_size % devices:
    raise errors.UsageError(f'batch_size={batch_size} must be divisible by '
                            f'devices={devices}.')
  config = run_config(base_config, variant=variant, num_classes=num_classes,
                      dtype=dtype, sizes=sizes or {}, remat=remat,
                      optimizer=optimizer, batch_size=batch_size,
                      image_size=image_size, strategy=strategy)
  model = build_model(config)
  if params is None and not repeats:  # Compile only: no values needed.
    params = models.param_shapes(model, image_size)
    params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), params)
  mesh_devices = benchmark_devices(devices)
  run, executable, compile_s, state_bytes = make_step(
      config, mode, params, mesh_devices)
  flops = models.flops_per_image(model, image_size) * (
      3 if mode == 'train' else 1) * batch_size
  mem = cost.compiled_memory(executable)
  row = {
      'variant': variant, 'mode': mode, 'batch_size': batch_size,
      'image_size': image_size, 'dtype': dtype,
      'optimizer': optimizer if mode == 'train' else None,
      'devices': devices, 'sharding': strategy, 'remat': remat,
      'compile_s': compile_s,
      'gflop_per_image': flops / batch_size / 1e9,
      'flops_per_device_fraction': cost.compiled_flops(executable) / flops,
      'collectives': cost.collective_stats(executable.as_text()),
      'state_bytes_per_device': state_bytes,
      'compiled_memory_mb': None if mem is None else mem / 2 ** 20,
      'device': device_name(mesh_devices[0]),
  }
  if not repeats:
    return row
  _timed(run)  # First execution: allocation and thread-pool warm-up.
  peak_fn, peak_flops = make_peak_fn(peak_size, jnp.dtype(dtype))
  times, cpu_times, peaks, peaks_cpu = [], [], [], []
  for _ in range(repeats):
    cpu = time.process_time()
    times.append(_timed(run))
    cpu_times.append(time.process_time() - cpu)
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
  step_s = statistics.median(times)
  # Each step is compared with the peak of its own round, so a change of
  # load on a shared machine between rounds cancels out of the fraction.
  row.update({
      'images_per_sec': batch_size / step_s,
      'images_per_sec_best': batch_size / min(times),
      'step_time_s': step_s,
      'step_time_spread': (max(times) - min(times)) / step_s,
      'achieved_gflops': flops / step_s / 1e9,
      'peak_gflops': statistics.median(peaks) / 1e9,
      # Per device: each device runs 1/devices of the step's FLOPs.
      'peak_fraction': statistics.median(
          [flops / devices / t / p for t, p in zip(times, peaks)]),
      # The same ratio in FLOPs per CPU-second of this process: less
      # sensitive to other processes taking the cores for a while.
      'peak_fraction_cpu_time': statistics.median(
          [flops / devices / t / p for t, p in zip(cpu_times, peaks_cpu)]),
      # ru_maxrss is in KiB on Linux; it is the process maximum so far.
      'max_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
  })
  return row


# The loop mode's default, relative to the repository root (where the README's
# commands run); the package does not ship configs/.
QUICKSTART_CONFIG = 'configs/quickstart.py'


def _loop_config(base, steps: int, log_every: int):
  """`base` shortened to `steps` steps, evaluated and saved only at the end."""
  config = base.copy_and_resolve_references()
  config.unlock()
  config.num_train_steps = steps
  config.warmup_steps = min(config.warmup_steps, steps // 2)
  config.log_every_steps = log_every
  config.eval_every_steps = config.checkpoint_every_steps = steps
  config.evals = {}
  config.profile_steps = 0
  return config


def time_steps_back_to_back(run, config, steps: int, rounds: int = 1):
  """Steps/s of `run.steps.train_step` called back to back on one batch.

  The step gets one placed batch of the run's own input, over and over, so
  nothing but the step's dispatch and computation is timed: the rate the
  training loop would reach if its host work cost nothing.

  Returns:
    One steps/s figure per round of `steps` steps.
  """
  from mixer_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  batch = sharding.shard_batch(
      next(input_pipeline.train_dataset(config).as_numpy_iterator()),
      run.mesh)
  carry = {'state': run.steps.init_fn(jax.random.PRNGKey(config.seed))}

  def steps_of(n):
    metrics = None
    for _ in range(n):
      carry['state'], metrics = run.steps.train_step(carry['state'], batch)
    return metrics
  _timed(lambda: steps_of(2))  # Compilation and warm-up.
  return [steps / _timed(lambda: steps_of(steps)) for _ in range(rounds)]


def benchmark_loop(base_config=None, *, steps: int = 600,
                   rounds: int = 3) -> dict[str, Any]:
  """The training loop's steps/s against its own step called back to back.

  Each round trains `base_config` (default configs/quickstart.py) for
  `steps` steps with `trainer.train_and_evaluate` in a fresh temporary
  workdir, logging 6 times (its input pipeline, prefetching, stop-request
  checks, metric fetches and logging; evaluation and saving only after the
  last step, outside the timed intervals) and reads the loop's steps/s
  from its metrics.jsonl (compilation excluded, as in every run). Then the
  same train step, built by the same builder in the same process, is timed
  back to back on one placed batch for as many steps. Rounds alternate the
  two, so a change of load on a shared machine hits both; `loop_to_step`
  is the median over rounds of each round's ratio.
  """
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  from mixer_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  import runpy  # pylint: disable=g-import-not-at-top
  from mixer_jax.training import reporting  # pylint: disable=g-import-not-at-top
  from mixer_jax.training import trainer  # pylint: disable=g-import-not-at-top
  if steps < 6 or rounds < 1:
    raise errors.UsageError(f'--loop_steps={steps} must be >= 6 and '
                            f'--repeats={rounds} >= 1.')
  if base_config is None:
    if not os.path.isfile(QUICKSTART_CONFIG):
      raise errors.UsageError(
          f'--mode=loop times {QUICKSTART_CONFIG} by default, which is not '
          f'in {os.getcwd()}: run from the repository root or pass '
          '--config=path/to/a/config.py.')
    base_config = runpy.run_path(QUICKSTART_CONFIG)['get_config']()
  config = _loop_config(base_config, steps, steps // 6)
  run = trainer.build_run(config, input_pipeline.dataset_info(config))
  loop_rates, step_rates, waits = [], [], []
  reporting.set_print_progress(False)
  try:
    for _ in range(rounds):
      workdir = tempfile.mkdtemp(prefix='mixer_jax_loop_')
      try:
        trainer.train_and_evaluate(config, workdir)
        records = [r for r in reporting.read_metrics(workdir)
                   if 'steps_per_sec' in r]
      finally:
        shutil.rmtree(workdir, ignore_errors=True)
      # The first interval starts at the first step's end (compilation out).
      loop_rates.append(statistics.median(r['steps_per_sec']
                                          for r in records))
      waits.append(statistics.median(r['input_wait_share'] for r in records))
      step_rates += time_steps_back_to_back(run, config, steps)
  finally:
    reporting.set_print_progress(True)
  return {
      'mode': 'loop', 'variant': config.model.variant,
      'batch_size': config.batch_size, 'image_size': config.image_size,
      'dataset': config.dataset, 'steps': steps, 'rounds': rounds,
      'loop_steps_per_sec': statistics.median(loop_rates),
      'step_steps_per_sec': statistics.median(step_rates),
      'loop_to_step': statistics.median(
          [l / s for l, s in zip(loop_rates, step_rates)]),
      'input_wait_share': statistics.median(waits),
      'devices': run.mesh.size, 'device': device_name(run.mesh.devices.flat[0]),
  }


def format_loop(row: dict[str, Any]) -> str:
  """The loop benchmark's result in three lines."""
  return (f"Training loop of {row['dataset']} (Mixer-{row['variant']}, batch "
          f"{row['batch_size']}, {row['image_size']}x{row['image_size']}) on "
          f"{row['device']}, median of {row['rounds']} rounds of "
          f"{row['steps']} steps:\n"
          f"  loop {row['loop_steps_per_sec']:.1f} steps/s, its step back "
          f"to back {row['step_steps_per_sec']:.1f} steps/s: loop/step "
          f"{row['loop_to_step']:.2f}\n"
          f"  input wait {100 * row['input_wait_share']:.0f}% of the loop's "
          "time")


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  """A fixed-width table of the rows, headed by the device name."""
  cols = [('mode', '{}'), ('batch', '{}'), ('devices', '{}'),
          ('sharding', '{}'), ('img/s', '{:.2f}'), ('step s', '{:.4g}'),
          ('spread', '{:.0%}'), ('compile s', '{:.1f}'),
          ('GFLOP/s', '{:.1f}'), ('of peak', '{:.1%}'), ('(cpu s)', '{:.1%}'),
          ('FLOPs/dev', '{:.3f}'), ('comm MiB', '{:.1f}'),
          ('state MiB/dev', '{:.1f}'), ('XLA MiB', '{:.1f}')]
  keys = ['mode', 'batch_size', 'devices', 'sharding', 'images_per_sec',
          'step_time_s', 'step_time_spread', 'compile_s', 'achieved_gflops',
          'peak_fraction', 'peak_fraction_cpu_time',
          'flops_per_device_fraction', 'comm_mib', 'state_mib',
          'compiled_memory_mb']
  body = []
  for r in rows:
    r = dict(r, comm_mib=sum(c['bytes'] for c in r['collectives'].values())
             / 2 ** 20, state_mib=r['state_bytes_per_device'] / 2 ** 20,
             sharding=r['sharding'] + ('+remat' if r['remat'] else ''))
    body.append([fmt.format(r[k]) if r.get(k) is not None else '-'
                 for (_, fmt), k in zip(cols, keys)])
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
               'of this process. FLOPs/dev: compiled FLOPs of one device over '
               'the whole step\'s; comm: bytes of all collectives per step.')
  return '\n'.join(lines)


def run_benchmark(*, variant: str, mode: str, batch_sizes: Sequence[int],
                  **kwargs) -> list[dict[str, Any]]:
  """Runs every configuration of one command.

  Args:
    variant: model variant.
    mode: 'infer', 'train' or 'both'.
    batch_sizes: batch sizes to run.
    **kwargs: passed to `benchmark_config` (image_size, dtype, repeats, ...).

  Returns:
    One dict per configuration.
  """
  if mode not in MODES + ('both',):
    raise errors.UsageError(f'Unknown mode {mode!r}; use infer, train or both.')
  modes = MODES if mode == 'both' else (mode,)
  config = run_config(
      kwargs.get('base_config'), variant=variant,
      num_classes=kwargs.get('num_classes', 1000), dtype=kwargs['dtype'],
      sizes=kwargs.get('sizes') or {}, batch_size=1,
      image_size=kwargs['image_size'])
  model = build_model(config)
  # The same parameters for every configuration (random, so timings see
  # real values; all zeros when only compiling).
  params = None
  if kwargs.get('repeats', 1):
    params = models.init_params(model, jax.random.PRNGKey(0),
                                kwargs['image_size'])
  return [benchmark_config(variant=variant, mode=m, batch_size=batch_size,
                           params=params, **kwargs)
          for batch_size in batch_sizes for m in modes]


def define_flags() -> None:
  """Defines the command's flags (only when run as a command, so importing
  this module next to other commands never redefines a flag)."""
  config_flags.DEFINE_config_file(
      'config', None, 'Training config (file.py[:ARG], overrides with '
      '--config.FIELD=VALUE) whose train step is timed; default the '
      'package defaults (mixer_jax/config_defaults.py). The flags below set '
      'its model, batch and sharding.',
      lock_config=False)
  flags.DEFINE_string('variant', 'B_16', 'Mixer variant, e.g. B_16.')
  flags.DEFINE_enum('mode', 'infer', ('infer', 'train', 'both', 'loop'),
                    'infer: forward pass; train: forward + backward + '
                    'optimizer update; both: one row of each; loop: the '
                    'training loop (default config configs/quickstart.py) '
                    'against its own step called back to back.')
  flags.DEFINE_integer('loop_steps', 600, 'Steps per round of --mode=loop '
                       '(--repeats rounds).')
  flags.DEFINE_list('batch_size', ['16'], 'Global batch size(s), comma '
                    'separated.')
  flags.DEFINE_integer('image_size', 224, 'Square image side.')
  flags.DEFINE_enum('dtype', 'float32', ('float32', 'bfloat16'),
                    'Computation dtype of the model and the peak matmul.')
  flags.DEFINE_integer('repeats', 5, 'Timed steps per configuration; 0 '
                       'compiles only.')
  flags.DEFINE_enum('optimizer', 'sgd', ('sgd', 'adam'),
                    'Optimizer of the training step.')
  flags.DEFINE_integer('num_classes', 1000, 'Head size.')
  flags.DEFINE_integer('peak_size', 2048,
                       'Side of the square matmul giving the peak.')
  flags.DEFINE_integer('devices', 1, 'Devices of the mesh; fake CPU devices '
                       'when the machine has fewer.')
  flags.DEFINE_enum('sharding', 'replicate', sharding.STRATEGIES,
                    'Placement of parameters and optimizer state.')
  flags.DEFINE_bool('remat', False, 'Rematerialise each block in training.')
  flags.DEFINE_bool('json', False, 'One JSON object per line, no table.')
  command_line.define_verbose_flag()
  for name in SIZE_FLAGS:
    flags.DEFINE_integer(name, None, f'Override the variant\'s {name}.')


def main(argv: Sequence[str]) -> None:
  command_line.set_up_output(flags.FLAGS.verbose)
  # User errors are one line (exit 1); anything else keeps its traceback.
  with command_line.user_errors_as_one_line():
    rows = _run_from_flags(argv, flags.FLAGS)
  if flags.FLAGS.mode == 'loop' and not flags.FLAGS.json:
    print(format_loop(rows[0]), flush=True)
  elif flags.FLAGS.json:
    for row in rows:
      print(json.dumps(row), flush=True)
  else:
    print(format_table(rows), flush=True)


def _run_from_flags(argv, f):
  """Checks the flags (errors.UsageError) and runs the benchmark."""
  if len(argv) > 1:
    raise errors.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    batch_sizes = [int(b) for b in f.batch_size]
  except ValueError as e:
    raise errors.UsageError(
        f'--batch_size must be integers, e.g. 8,16: {e}') from None
  if f.devices < 1:
    raise errors.UsageError('--devices must be >= 1.')
  sizes = {k: f[k].value for k in SIZE_FLAGS}
  try:  # The variant and size flags, checked before anything is built.
    models.get_spec(f.variant, **{k: v for k, v in sizes.items()
                                  if v is not None})
  except ValueError as e:
    raise errors.UsageError(f'--variant={f.variant}: {e}') from None
  # Only takes effect before JAX starts its CPU backend, hence first.
  jax.config.update('jax_num_cpu_devices', max(f.devices, 1))
  if f.mode == 'loop':
    return [benchmark_loop(f.config, steps=f.loop_steps, rounds=f.repeats)]
  return run_benchmark(
      variant=f.variant, mode=f.mode, batch_sizes=batch_sizes,
      image_size=f.image_size, dtype=f.dtype, repeats=f.repeats,
      optimizer=f.optimizer, num_classes=f.num_classes,
      peak_size=f.peak_size, sizes=sizes, devices=f.devices,
      strategy=f.sharding, remat=f.remat, base_config=f.config)


if __name__ == '__main__':
  define_flags()
  app.run(main)
