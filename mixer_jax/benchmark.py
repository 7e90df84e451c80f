r"""Speed of the model's step, of the training loop and of the input pipeline.

  python -m mixer_jax.benchmark --variant=B_16 --mode=infer --batch_size=16
  python -m mixer_jax.benchmark --variant=L_16 --mode=train --devices=8 \
      --sharding=fsdp --remat --batch_size=64 --optimizer=adam --repeats=0
  python -m mixer_jax.benchmark --mode=loop  # quick-start loop vs its step
  python -m mixer_jax.benchmark --mode=input --recipe=inception --compare_timm

`infer|train|both`: the trainer's own step (`compiled.build`: the same
shardings and donation) of `--config` (default mixer_jax/config_defaults.py)
with the flags' model, batch, image size, optimizer and sharding, on
`--devices` devices (fake CPU ones when there are fewer). Per row: images/s
(median of the timed repeats), compile time, FLOP/s (`models.flops_per_image`,
training 3x) and their fraction of one device's peak, a square matmul of the
same dtype timed between the steps so that both see the same load; from the
executable, its FLOPs per device over the step's (1/N is a perfect split),
collectives and state bytes per device (`--repeats=0`: these only).

`loop`: steps/s of `train_and_evaluate` on `--config` (default
configs/quickstart.py) against its train step called back to back on one
placed batch, in the same process: what the loop's host work costs.

`input`: images/s of the training input pipeline on `--num_images` JPEGs
made here (smooth colour fields plus noise, quality 90: like ImageNet photos
to decode), 'finetune' (random crop, resize, flip) and/or 'inception' (the
same plus RandAugment(2, 15)) recipes; also per core and per CPU-second of
the loader's threads and processes, the steadier figure on a shared
machine. `--compare_timm` (with torch, torchvision and timm installed)
alternates each timing with timm's loader on the same files, batch and
cores (ImageFolder, `timm.data.create_transform(size, is_training=True)`,
plus `auto_augment='rand-m15-n2'` for inception, one DataLoader worker per
core, in a child process) and ends with both medians and their ratios.
"""

# First, before TensorFlow loads: it quiets TensorFlow's C++ start-up lines.
from mixer_jax.training import command_line  # pylint: disable=g-bad-import-order

import functools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
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
# The loop mode's default, relative to the repository root (where the
# README's commands run); the package does not ship configs/.
QUICKSTART_CONFIG = 'configs/quickstart.py'


def cores() -> int:
  """CPU cores this process may run on."""
  return len(os.sched_getaffinity(0))


def device_name(device=None) -> str:
  """What runs the computation: the CPU model, or the accelerator's kind."""
  device = device or jax.devices()[0]
  if device.platform == 'cpu':
    return (f'{throughput.processor_name()} ({len(jax.devices("cpu"))} JAX '
            f'devices, {cores()} cores)')
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
  """The training config whose step is timed: `base` (default the
  package's defaults) with these fields set; its loss, mixup, clipping,
  weight decay, accumulation, fsdp threshold and mesh are kept."""
  config = (base or config_defaults.get_config()).copy_and_resolve_references()
  config.unlock()
  config.model.variant, config.model.dtype = variant, dtype
  config.model.remat = remat
  config.model.update({k: v for k, v in sizes.items() if v is not None})
  config.num_classes = num_classes
  config.optimizer, config.batch_size = optimizer, batch_size
  config.image_size, config.sharding = image_size, strategy
  return config


def benchmark_devices(count: int) -> list:
  """`count` devices: real ones when there are enough, else CPU devices
  (fake ones exist only if `jax_num_cpu_devices` was set before JAX
  started; `main` does that for `--devices`)."""
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

  The functions come from `compiled.build`, the trainer's builder, over the
  mesh of `config.mesh` made by `sharding.create_mesh` as the trainer's.

  Args:
    config: the run's config (`run_config`).
    mode: 'train' or 'infer'.
    params: float32 parameters to start from (default: initialised).
    devices: the mesh's devices (default the first device alone).

  Returns:
    (run, compiled, compile_seconds, state_bytes): `run()` performs one step
    and returns its output (in training the state is carried inside,
    donated from step to step); `compiled` is the executable.
  """
  mesh = sharding.create_mesh(devices or jax.devices()[:1], axes=config.mesh)
  model = model_from_config.create_model(config, config.num_classes)
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
    if config.num_classes <= 0:
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
  """Compiles and times one configuration; returns its row (a dict).

  Model steps and the peak matmul alternate (step, matmuls, step, ...), so
  on a shared machine both see the same load. Each round's peak is the
  faster of two timed matmuls (after an untimed one); `peak_fraction` is
  the median over rounds of one device's FLOP/s (the step's FLOPs /
  devices / step time) over that round's peak. `repeats=0` compiles only
  (no timing fields); `params` (default initialised) are float32
  parameters; the other arguments set `run_config`'s fields.
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
  model = model_from_config.create_model(config, num_classes)
  if params is None and not repeats:  # Compile only: no values needed.
    params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype),
                          models.param_shapes(model, image_size))
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


def run_benchmark(*, variant: str, mode: str, batch_sizes: Sequence[int],
                  **kwargs) -> list[dict[str, Any]]:
  """One row per batch size and mode ('infer', 'train' or 'both'); kwargs
  go to `benchmark_config`."""
  if mode not in MODES + ('both',):
    raise errors.UsageError(f'Unknown mode {mode!r}; use infer, train or both.')
  return [benchmark_config(variant=variant, mode=m, batch_size=batch_size,
                           **kwargs)
          for batch_size in batch_sizes
          for m in (MODES if mode == 'both' else (mode,))]


# ---------------------------------------------------------- --mode=loop


def time_steps_back_to_back(run, config, steps: int) -> float:
  """Steps/s of `run.steps.train_step` called back to back on one placed
  batch of the run's own input: the rate the loop would reach if its host
  work cost nothing."""
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
  return steps / _timed(lambda: steps_of(steps))


def benchmark_loop(base_config=None, *, steps: int = 600,
                   rounds: int = 3) -> dict[str, Any]:
  """The training loop's steps/s against its own step called back to back.

  Each round trains `base_config` (default configs/quickstart.py) for
  `steps` steps with `trainer.train_and_evaluate` in a fresh temporary
  workdir, logging 6 times, evaluating and saving only after the last step
  (outside the timed intervals), and reads the loop's steps/s from its
  metrics.jsonl (compilation excluded, as in every run); then times the
  same train step, from the same builder, back to back for as many steps.
  Rounds alternate the two, so a change of load hits both; `loop_to_step`
  is the median over rounds of each round's ratio.
  """
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
  config = base_config.copy_and_resolve_references()
  config.unlock()
  config.num_train_steps = steps
  config.warmup_steps = min(config.warmup_steps, steps // 2)
  config.log_every_steps = steps // 6
  config.eval_every_steps = config.checkpoint_every_steps = steps
  config.evals = {}
  config.profile_steps = 0
  run = trainer.build_run(config, input_pipeline.dataset_info(config))
  loop_rates, step_rates, waits = [], [], []
  reporting.set_print_progress(False)
  try:
    for _ in range(rounds):
      with tempfile.TemporaryDirectory(prefix='mixer_jax_loop_') as workdir:
        trainer.train_and_evaluate(config, workdir)
        records = [r for r in reporting.read_metrics(workdir)
                   if 'steps_per_sec' in r]
      # The first interval starts at the first step's end (compilation out).
      loop_rates.append(statistics.median(r['steps_per_sec']
                                          for r in records))
      waits.append(statistics.median(r['input_wait_share'] for r in records))
      step_rates.append(time_steps_back_to_back(run, config, steps))
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


# --------------------------------------------------------- --mode=input


def make_jpegs(root, num_images, width, height, num_classes=10, seed=0):
  """Writes root/train/class_k/i.jpg synthetic photos; returns bytes/image."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  total = 0
  for i in range(num_images):
    folder = os.path.join(root, 'train', f'class_{i % num_classes}')
    os.makedirs(folder, exist_ok=True)
    # A coarse random colour field, upsampled smoothly, plus sensor-like
    # noise: compresses like a photo, unlike pure noise or flat colour.
    coarse = rng.uniform(0, 255, (height // 32 + 2, width // 32 + 2, 3))
    smooth = tf.image.resize(coarse[None], [height, width], 'bicubic')[0]
    noisy = smooth + rng.normal(0, 6, (height, width, 3))
    data = tf.io.encode_jpeg(tf.cast(tf.clip_by_value(noisy, 0, 255),
                                     tf.uint8), quality=90).numpy()
    with open(os.path.join(folder, f'{i}.jpg'), 'wb') as f:
      f.write(data)
    total += len(data)
  return total / max(num_images, 1)


def input_config(base, recipe, folder, image_size, batch_size):
  """A copy of config `base` reading `folder`, with one recipe's pp fields."""
  config = (base or config_defaults.get_config()).copy_and_resolve_references()
  config.unlock()
  config.dataset, config.folder, config.train_split = 'folder', folder, 'train'
  config.num_classes, config.shuffle_buffer = -1, 1_000
  config.image_size, config.batch_size = image_size, batch_size
  config.pp.train_crop = recipe
  config.pp.randaugment_layers = 0 if recipe == 'finetune' else 2
  config.pp.randaugment_magnitude = 15
  return config


def input_images_per_second(config, num_batches, warmup_batches):
  """(images/s, images per CPU-second of this process) of the training
  pipeline of `config`, batches taken to the host as the trainer takes
  them."""
  from mixer_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  iterator = input_pipeline.train_dataset(
      config, process_index=0, process_count=1).as_numpy_iterator()
  for _ in range(warmup_batches):
    next(iterator)
  start, cpu = time.perf_counter(), time.process_time()
  for _ in range(num_batches):
    next(iterator)
  images = num_batches * config.batch_size
  return (images / (time.perf_counter() - start),
          images / (time.process_time() - cpu))


# timm's loader runs in a child interpreter: PyTorch and TensorFlow in one
# process can crash it (their bundled native libraries clash). It prints
# images/s and images per CPU-second of itself and its workers (psutil
# counts them; 'nan' without psutil).
_TIMM_CHILD = """
import math, os, sys, time
import timm.data, torch, torchvision
try:
  import psutil
except ImportError:
  psutil = None
folder, recipe = sys.argv[1], sys.argv[2]
size, batch, workers, num, warmup = map(int, sys.argv[3:8])
transform = timm.data.create_transform(
    size, is_training=True,
    auto_augment='rand-m15-n2' if recipe == 'inception' else None)
data = torchvision.datasets.ImageFolder(os.path.join(folder, 'train'),
                                        transform=transform)
loader = torch.utils.data.DataLoader(
    data, batch_size=batch, shuffle=True, num_workers=workers,
    drop_last=True, persistent_workers=workers > 0)
def batches():
  while True:
    yield from loader
iterator = batches()
def cpu():
  if psutil is None:
    return math.nan
  me = psutil.Process()
  return sum(sum(p.cpu_times()[:2])
             for p in [me] + me.children(recursive=True))
for _ in range(warmup):
  next(iterator)
start, used = time.perf_counter(), cpu()
for _ in range(num):
  next(iterator)
print(num * batch / (time.perf_counter() - start), num * batch / (cpu() - used))
"""


def timm_images_per_second(folder, recipe, image_size, batch_size,
                           num_batches, warmup_batches):
  """(images/s, images per CPU-second) of timm's loader, one worker per
  core (see the module docstring)."""
  args = [folder, recipe] + [str(v) for v in (
      image_size, batch_size, cores(), num_batches, warmup_batches)]
  done = subprocess.run([sys.executable, '-c', _TIMM_CHILD, *args],
                        capture_output=True, text=True, check=False)
  if done.returncode:
    raise RuntimeError(f"timm's loader failed:\n{done.stderr[-2000:]}")
  return tuple(float(v) for v in done.stdout.split()[-2:])


def timm_missing() -> Optional[str]:
  """The first of torch, torchvision, timm that is not installed, or None."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  return next((name for name in ('torch', 'torchvision', 'timm')
               if importlib.util.find_spec(name) is None), None)


def benchmark_input(base_config=None, *, recipes: Sequence[str], folder: str,
                    image_size: int, batch_size: int, repeats: int,
                    num_batches: int, warmup_batches: int,
                    compare_timm: bool = False) -> list[dict[str, Any]]:
  """One row per timing of the input pipeline of each recipe on the images
  of `folder`/train, alternating with timm's loader when `compare_timm`
  (and it is installed)."""
  rows = []
  for recipe in recipes:
    config = input_config(base_config, recipe, folder, image_size, batch_size)
    loaders = {'mixer_jax': functools.partial(
        input_images_per_second, config, num_batches, warmup_batches)}
    if compare_timm:
      loaders['timm'] = functools.partial(
          timm_images_per_second, folder, recipe, image_size, batch_size,
          num_batches, warmup_batches)
    for _ in range(repeats):
      for loader, timing in loaders.items():
        rate, per_cpu_second = timing()
        rows.append({'mode': 'input', 'recipe': recipe, 'loader': loader,
                     'images_per_sec': rate, 'per_core': rate / cores(),
                     'per_cpu_second': per_cpu_second, 'cores': cores(),
                     'image_size': image_size, 'batch_size': batch_size})
  return rows


def format_input(rows: Sequence[dict[str, Any]]) -> str:
  """One line per timing; per recipe timed with timm, the medians of both
  and their ratios."""
  lines = [f'CPU: {throughput.processor_name()}']
  for r in rows:
    lines.append(
        f"{r['recipe']:>9} {r['loader']:>9}: {r['images_per_sec']:7.1f} "
        f"images/s, {r['per_core']:6.1f} per core, {r['per_cpu_second']:6.1f}"
        f" per CPU-second  ({r['image_size']}x{r['image_size']}, batch "
        f"{r['batch_size']}, {r['cores']} cores)")
  timed_timm = any(r['loader'] == 'timm' for r in rows)
  for recipe in dict.fromkeys(r['recipe'] for r in rows if timed_timm):
    ours, timm = ([statistics.median(r[k] for r in rows
                                     if (r['recipe'], r['loader']) ==
                                     (recipe, loader))
                   for k in ('images_per_sec', 'per_cpu_second')]
                  for loader in ('mixer_jax', 'timm'))
    lines.append(f'{recipe:>9}: medians {ours[0]:.1f} images/s vs timm '
                 f'{timm[0]:.1f}: {ours[0] / timm[0]:.2f}x; per CPU-second '
                 f'{ours[1]:.1f} vs {timm[1]:.1f}: {ours[1] / timm[1]:.2f}x')
  return '\n'.join(lines)


# ------------------------------------------------------------- Output.


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
  cols = [('mode', '{}', 'mode'), ('batch', '{}', 'batch_size'),
          ('devices', '{}', 'devices'), ('sharding', '{}', 'sharding'),
          ('img/s', '{:.2f}', 'images_per_sec'),
          ('step s', '{:.4g}', 'step_time_s'),
          ('spread', '{:.0%}', 'step_time_spread'),
          ('compile s', '{:.1f}', 'compile_s'),
          ('GFLOP/s', '{:.1f}', 'achieved_gflops'),
          ('of peak', '{:.1%}', 'peak_fraction'),
          ('(cpu s)', '{:.1%}', 'peak_fraction_cpu_time'),
          ('FLOPs/dev', '{:.3f}', 'flops_per_device_fraction'),
          ('comm MiB', '{:.1f}', 'comm_mib'),
          ('state MiB/dev', '{:.1f}', 'state_mib'),
          ('XLA MiB', '{:.1f}', 'compiled_memory_mb')]
  body = []
  for r in rows:
    r = dict(r, comm_mib=sum(c['bytes'] for c in r['collectives'].values())
             / 2 ** 20, state_mib=r['state_bytes_per_device'] / 2 ** 20,
             sharding=r['sharding'] + ('+remat' if r['remat'] else ''))
    body.append([fmt.format(r[k]) if r.get(k) is not None else '-'
                 for _, fmt, k in cols])
  widths = [max(len(h), *(len(b[i]) for b in body))
            for i, (h, _, _) in enumerate(cols)]
  r = rows[0]
  lines = [f"Mixer-{r['variant']} {r['image_size']}x{r['image_size']} "
           f"{r['dtype']} on {r['device']}",
           '  '.join(h.rjust(w) for (h, _, _), w in zip(cols, widths))]
  lines.extend('  '.join(c.rjust(w) for c, w in zip(b, widths)) for b in body)
  lines.append('Median of repeats. Training counts 3x the forward FLOPs; '
               '"of peak" divides by a square matmul of the same dtype timed '
               'between the steps; "(cpu s)" is the same ratio per CPU-second '
               'of this process. FLOPs/dev: compiled FLOPs of one device over '
               'the whole step\'s; comm: bytes of all collectives per step.')
  return '\n'.join(lines)


def define_flags() -> None:
  """Defines the command's flags (only when run as a command, so importing
  this module next to other commands never redefines a flag)."""
  config_flags.DEFINE_config_file(
      'config', None, 'Training config (file.py[:ARG], overrides with '
      '--config.FIELD=VALUE); default the package defaults '
      '(mixer_jax/config_defaults.py), for --mode=loop '
      'configs/quickstart.py. The flags below set its model, batch and '
      'sharding.', lock_config=False)
  flags.DEFINE_string('variant', 'B_16', 'Mixer variant, e.g. B_16.')
  flags.DEFINE_enum('mode', 'infer', ('infer', 'train', 'both', 'loop',
                                      'input'),
                    'infer: forward pass; train: forward + backward + '
                    'optimizer update; both: one row of each; loop: the '
                    'training loop against its own step called back to '
                    'back; input: the training input pipeline on made '
                    'JPEGs.')
  flags.DEFINE_integer('loop_steps', 600, 'Steps per round of --mode=loop '
                       '(--repeats rounds).')
  flags.DEFINE_list('batch_size', ['16'], 'Global batch size(s), comma '
                    'separated.')
  flags.DEFINE_integer('image_size', 224, 'Square image side.')
  flags.DEFINE_enum('dtype', 'float32', ('float32', 'bfloat16'),
                    'Computation dtype of the model and the peak matmul.')
  flags.DEFINE_integer('repeats', 5, 'Timed steps per configuration (0 '
                       'compiles only); rounds of --mode=loop; timings per '
                       'loader of --mode=input.')
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
  flags.DEFINE_enum('recipe', 'both', ['both', 'finetune', 'inception'],
                    'Training preprocessing of --mode=input.')
  flags.DEFINE_integer('num_images', 1024, 'JPEG files --mode=input makes '
                       '(about 5 MB per 100 at 500x375).')
  flags.DEFINE_integer('width', 500, 'Width of the made images.')
  flags.DEFINE_integer('height', 375, 'Height of the made images.')
  flags.DEFINE_integer('num_batches', 20, 'Batches --mode=input times.')
  flags.DEFINE_integer('warmup_batches', 3, 'Batches --mode=input runs '
                       'before timing.')
  flags.DEFINE_string('data', '', 'Folder of --mode=input images (made when '
                      'it has no train/); default a temporary one.')
  flags.DEFINE_bool('compare_timm', False, "--mode=input: also time timm's "
                    'loader on the same files and cores (needs torch, '
                    'torchvision, timm).')
  flags.DEFINE_bool('json', False, 'One JSON object per line, no table.')
  command_line.define_verbose_flag()
  for name in SIZE_FLAGS:
    flags.DEFINE_integer(name, None, f'Override the variant\'s {name}.')


def main(argv: Sequence[str]) -> None:
  f = flags.FLAGS
  command_line.set_up_output(f.verbose)
  # User errors are one line (exit 1); anything else keeps its traceback.
  with command_line.user_errors_as_one_line():
    rows = _run_from_flags(argv, f)
  if f.json:
    print('\n'.join(json.dumps(row) for row in rows), flush=True)
  else:
    print({'loop': lambda rows: format_loop(rows[0]),
           'input': format_input}.get(f.mode, format_table)(rows), flush=True)


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
  if f.mode == 'input':
    return _input_from_flags(f, batch_sizes)
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


def _input_from_flags(f, batch_sizes):
  """--mode=input: makes the JPEGs unless --data has them, then times."""
  if f.repeats < 1 or f.num_batches < 1 or f.warmup_batches < 0:
    raise errors.UsageError('--mode=input needs --repeats >= 1, '
                            '--num_batches >= 1 and --warmup_batches >= 0.')
  command_line.load_tensorflow_quietly()  # The pipeline is TensorFlow's.
  missing = timm_missing() if f.compare_timm else None
  if missing:
    print(f'timm comparison skipped: {missing} is not installed (pip '
          'install torch torchvision timm).', flush=True)
  root = f.data or tempfile.mkdtemp(prefix='mixer_jax_input_')
  try:
    if not os.path.isdir(os.path.join(root, 'train')):
      size = make_jpegs(root, f.num_images, f.width, f.height)
      print(f'Made {f.num_images} JPEGs of {f.width}x{f.height}, '
            f'{size / 1024:.0f} KiB each, in {root}', flush=True)
    recipes = (['finetune', 'inception'] if f.recipe == 'both'
               else [f.recipe])
    return [row for batch_size in batch_sizes for row in benchmark_input(
        f.config, recipes=recipes, folder=root, image_size=f.image_size,
        batch_size=batch_size, repeats=f.repeats, num_batches=f.num_batches,
        warmup_batches=f.warmup_batches,
        compare_timm=f.compare_timm and not missing)]
  finally:
    if not f.data:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
  define_flags()
  app.run(main)
