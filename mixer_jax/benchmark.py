r"""Speed of the model's step, of the training loop and of the input pipeline.

  python -m mixer_jax.benchmark --variant=B_16 --mode=infer --batch_size=16
  python -m mixer_jax.benchmark --variant=L_16 --mode=train --devices=8 \
      --sharding=fsdp --remat --batch_size=64 --optimizer=adam --repeats=0
  python -m mixer_jax.benchmark --mode=loop  # quick-start loop vs its step
  python -m mixer_jax.benchmark --mode=input --recipe=inception --compare_timm

What each mode times and reports, and measured figures: docs/performance.md.
Flags are read and checked before JAX or TensorFlow loads.
"""

# First, before TensorFlow loads: it quiets TensorFlow's C++ start-up lines.
from mixer_jax.training import command_line  # pylint: disable=g-bad-import-order

import functools
import importlib.util
import json
import os
import resource
import runpy
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

from mixer_jax import config_defaults
from mixer_jax.training import errors

SIZE_FLAGS = ('num_blocks', 'hidden_dim', 'tokens_mlp_dim',
              'channels_mlp_dim')
# Relative to the repository root (where the README's commands run); the
# package does not ship configs/ or tools/.
QUICKSTART_CONFIG = 'configs/quickstart.py'
TIMM_LOADER = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'tools', 'timm_loader.py')


def cores() -> int:
  return len(os.sched_getaffinity(0))


def processor_name() -> str:
  from mixer_jax.training import throughput  # pylint: disable=g-import-not-at-top
  return throughput.processor_name()


def device_name(device, count: int) -> str:
  """The CPU model (with the mesh's `count` devices), or the accelerator."""
  if device.platform == 'cpu':
    return f'{processor_name()} ({count} JAX devices, {cores()} cores)'
  return device.device_kind


def _timed(fn) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def with_fields(base, **fields):
  """A resolved, unlocked copy of config `base` (default the package's
  defaults) with `fields` set; the name 'a__b' sets field a.b."""
  config = (base or config_defaults.get_config()).copy_and_resolve_references()
  config.unlock()
  config.update_from_flattened_dict(
      {k.replace('__', '.'): v for k, v in fields.items()})
  return config


# ------------------------------------------------ --mode=infer|train|both


def make_peak_fn(size: int, dtype: Any):
  """A compiled `size`x`size` matmul of `dtype` and its FLOP count."""
  import jax  # pylint: disable=g-import-not-at-top
  a, b = jax.random.normal(jax.random.PRNGKey(1), (2, size, size),
                           jax.numpy.dtype(dtype))
  matmul = jax.jit(jax.numpy.matmul)
  jax.block_until_ready(matmul(a, b))
  return functools.partial(matmul, a, b), 2.0 * size ** 3


def make_step(config, mode: str, params=None, devices=None):
  """The trainer's own train step (`mode='train'`) or forward pass, compiled
  by `compiled.build` on `devices` (default the first one).

  Returns (run, executable, compile_seconds, state_bytes): `run()` performs
  one step (a training state is carried inside, donated step to step).
  """
  # pylint: disable=g-import-not-at-top
  import jax
  from mixer_jax import model_from_config
  from mixer_jax import models
  from mixer_jax.training import compiled
  from mixer_jax.training import cost
  from mixer_jax.training import optim
  from mixer_jax.training import sharding
  # pylint: enable=g-import-not-at-top
  mesh = sharding.create_mesh(devices or jax.devices()[:1], axes=config.mesh)
  model = model_from_config.create_model(config, config.num_classes)
  rng = jax.random.PRNGKey(2)
  images = jax.random.uniform(
      rng, (config.batch_size, config.image_size, config.image_size, 3),
      minval=-1.0, maxval=1.0)
  if mode == 'infer':
    functions = compiled.build(config, model, mesh)
    if params is None:
      params = models.init_params(model, jax.random.PRNGKey(0),
                                  config.image_size)
    state, batch, fn = params, images, functions.serve_step
  else:
    if config.num_classes <= 0:
      raise errors.UsageError('--mode=train needs a head: set --num_classes > 0.')
    # The schedule's length only sets learning-rate values, not the work.
    num_steps = config.warmup_steps + 1000
    functions = compiled.build(
        config, model, mesh, tx=optim.create_optimizer(config, num_steps),
        num_train_steps=num_steps)
    state = functions.init_fn(jax.random.PRNGKey(0))
    labels = jax.nn.one_hot(jax.random.randint(
        rng, (config.batch_size,), 0, config.num_classes), config.num_classes)
    batch, fn = {'image': images, 'label': labels}, functions.train_step
  if params is not None:  # A placed copy: training steps donate the state.
    params = sharding.put(params, functions.params_sharding)
    state = params if mode == 'infer' else state.replace(params=params)
  batch = sharding.shard_batch(batch, mesh)
  start = time.perf_counter()
  executable = fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  carry = {'state': state}

  def run():
    if mode == 'infer':
      return executable(state, batch)
    carry['state'], metrics = executable(carry['state'], batch)
    return metrics['loss']
  return run, executable, compile_s, cost.state_bytes_per_device(state)


def benchmark_config(config, mode: str, *, repeats: int, devices: int = 1,
                     peak_size: int = 2048) -> dict[str, Any]:
  """Compiles and times the step of `config` (`mode`: 'infer' or 'train')
  on `devices` devices; returns its row (a dict).

  Steps and the peak matmul alternate, so on a shared machine both see the
  same load. A round's peak is the fastest of three matmuls (the first
  after a step runs cold); `peak_fraction` is the median over rounds of one
  device's FLOP/s over its round's peak. `repeats=0` compiles only.
  """
  # pylint: disable=g-import-not-at-top
  import jax
  from mixer_jax import model_from_config
  from mixer_jax import models
  from mixer_jax.training import cost
  # pylint: enable=g-import-not-at-top
  batch_size, image_size = config.batch_size, config.image_size
  if batch_size <= 0 or batch_size % devices or repeats < 0:
    raise errors.UsageError(f'batch_size={batch_size} must be positive and '
                            f'divisible by devices={devices}, repeats='
                            f'{repeats} >= 0.')
  # Fake CPU devices exist if `jax_num_cpu_devices` was set before JAX
  # started (`main` does it).
  mesh_devices = jax.devices()
  if len(mesh_devices) < devices:
    mesh_devices = jax.devices('cpu')
  if len(mesh_devices) < devices:
    raise errors.UsageError(
        f'--devices={devices}, but JAX sees only {len(mesh_devices)} '
        'device(s); run as a command (it sets jax_num_cpu_devices) or set '
        f'XLA_FLAGS=--xla_force_host_platform_device_count={devices}.')
  model = model_from_config.create_model(config, config.num_classes)
  # Compiled only (repeats=0): any values do, zeros cost no initialisation.
  params = None if repeats else jax.tree.map(
      lambda x: np.zeros(x.shape, x.dtype),
      models.param_shapes(model, image_size))
  run, executable, compile_s, state_bytes = make_step(
      config, mode, params, mesh_devices[:devices])
  flops = models.flops_per_image(model, image_size) * (
      3 if mode == 'train' else 1) * batch_size
  mem = cost.compiled_memory(executable)
  row = {
      'variant': config.model.variant, 'mode': mode, 'batch_size': batch_size,
      'image_size': image_size, 'dtype': config.model.dtype,
      'optimizer': config.optimizer if mode == 'train' else None,
      'devices': devices, 'sharding': config.sharding,
      'remat': config.model.remat,
      'compile_s': compile_s, 'gflop_per_image': flops / batch_size / 1e9,
      'flops_per_device_fraction': cost.compiled_flops(executable) / flops,
      'collectives': cost.collective_stats(executable.as_text()),
      'state_bytes_per_device': state_bytes,
      'compiled_memory_mb': None if mem is None else mem / 2 ** 20,
      'device': device_name(mesh_devices[0], devices)}
  if not repeats:
    return row
  _timed(run)  # First execution: allocation and thread-pool warm-up.
  peak_fn, peak_flops = make_peak_fn(peak_size, config.model.dtype)
  times, peaks = [], []
  for _ in range(repeats):
    times.append(_timed(run))
    peaks.append(peak_flops / min(_timed(peak_fn) for _ in range(3)))
  step_s = statistics.median(times)
  return dict(
      row, images_per_sec=batch_size / step_s,
      achieved_gflops=flops / step_s / 1e9,
      peak_gflops=statistics.median(peaks) / 1e9,
      # Each device runs 1/devices of the step's FLOPs.
      peak_fraction=statistics.median(
          flops / devices / t / p for t, p in zip(times, peaks)),
      # ru_maxrss is in KiB on Linux; it is the process maximum so far.
      max_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  """A fixed-width table of the rows, headed by the device name."""
  cols = {'mode': '{}', 'batch_size': '{}', 'devices': '{}', 'sharding': '{}',
          'images_per_sec': '{:.2f}', 'compile_s': '{:.1f}',
          'achieved_gflops': '{:.1f}', 'peak_fraction': '{:.1%}',
          'flops_per_device_fraction': '{:.3f}', 'comm_mib': '{:.1f}',
          'state_mib': '{:.1f}', 'compiled_memory_mb': '{:.1f}'}
  table = [['mode', 'batch', 'devices', 'sharding', 'img/s', 'compile s',
            'GFLOP/s', 'of peak', 'FLOPs/dev', 'comm MiB', 'state MiB/dev',
            'XLA MiB']]
  for r in rows:
    r = dict(r, comm_mib=sum(c['bytes'] for c in r['collectives'].values())
             / 2 ** 20, state_mib=r['state_bytes_per_device'] / 2 ** 20,
             sharding=r['sharding'] + ('+remat' if r['remat'] else ''))
    table.append(['-' if r.get(k) is None else fmt.format(r[k])
                  for k, fmt in cols.items()])
  widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
  r = rows[0]
  return '\n'.join(
      [f"Mixer-{r['variant']} {r['image_size']}x{r['image_size']} "
       f"{r['dtype']} on {r['device']}"] +
      ['  '.join(c.rjust(w) for c, w in zip(line, widths)) for line in table] +
      ['Median of repeats. Training counts 3x the forward FLOPs; "of peak" '
       'divides by a square matmul of the same dtype timed between the '
       "steps. FLOPs/dev: compiled FLOPs of one device over the whole step's;"
       ' comm: bytes of all collectives per step.'])


# ---------------------------------------------------------- --mode=loop


def benchmark_loop(base_config=None, *, steps: int = 600,
                   rounds: int = 3) -> dict[str, Any]:
  """The training loop's steps/s against its own step called back to back
  (docs/performance.md); the loop's rate is read from its metrics.jsonl,
  so compilation is excluded as in every run."""
  # pylint: disable=g-import-not-at-top
  import jax
  from mixer_jax.data import input_pipeline
  from mixer_jax.training import reporting
  from mixer_jax.training import sharding
  from mixer_jax.training import trainer
  # pylint: enable=g-import-not-at-top
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
  config = with_fields(
      base_config, num_train_steps=steps, log_every_steps=steps // 6,
      eval_every_steps=steps, checkpoint_every_steps=steps, profile_steps=0)
  config.warmup_steps = min(config.warmup_steps, steps // 2)
  config.evals = {}
  run = trainer.build_run(config, input_pipeline.dataset_info(config))
  batch = sharding.shard_batch(
      next(input_pipeline.train_dataset(config).as_numpy_iterator()),
      run.mesh)
  carry = {'state': run.steps.init_fn(jax.random.PRNGKey(config.seed))}

  def steps_of(n):
    for _ in range(n):
      carry['state'], metrics = run.steps.train_step(carry['state'], batch)
    return metrics['loss']
  loop_rates, step_rates, waits = [], [], []
  reporting.set_print_progress(False)
  try:
    for _ in range(rounds):
      with tempfile.TemporaryDirectory(prefix='mixer_jax_loop_') as workdir:
        trainer.train_and_evaluate(config, workdir)
        records = [r for r in reporting.read_metrics(workdir)
                   if 'steps_per_sec' in r]
      loop_rates.append(statistics.median(r['steps_per_sec']
                                          for r in records))
      waits.append(statistics.median(r['input_wait_share'] for r in records))
      _timed(lambda: steps_of(2))  # Compilation and warm-up.
      step_rates.append(steps / _timed(lambda: steps_of(steps)))
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
      'device': device_name(run.mesh.devices.flat[0], run.mesh.size)}


def format_loop(row: dict[str, Any]) -> str:
  return (f"Training loop of {row['dataset']} (Mixer-{row['variant']}, batch "
          f"{row['batch_size']}, {row['image_size']}x{row['image_size']}) on "
          f"{row['device']}, median of {row['rounds']} rounds of "
          f"{row['steps']} steps:\n  loop {row['loop_steps_per_sec']:.1f} "
          f"steps/s, its step back to back {row['step_steps_per_sec']:.1f} "
          f"steps/s: loop/step {row['loop_to_step']:.2f}\n  input wait "
          f"{100 * row['input_wait_share']:.0f}% of the loop's time")


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
  return with_fields(
      base, dataset='folder', folder=folder, train_split='train',
      num_classes=-1, shuffle_buffer=1_000, image_size=image_size,
      batch_size=batch_size, pp__train_crop=recipe,
      pp__randaugment_layers=0 if recipe == 'finetune' else 2,
      pp__randaugment_magnitude=15)


def input_images_per_second(config, num_batches, warmup_batches):
  """(images/s, images per CPU-second of this process) of the training
  pipeline of `config`, batches taken to the host as the trainer does."""
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


def timm_images_per_second(folder, recipe, image_size, batch_size,
                           num_batches, warmup_batches):
  """(images/s, images per CPU-second) of timm's loader, one worker per core,
  in a child interpreter (PyTorch and TensorFlow in one process can crash)."""
  args = [str(v) for v in (folder, recipe, image_size, batch_size, cores(),
                           num_batches, warmup_batches)]
  done = subprocess.run([sys.executable, TIMM_LOADER, *args],
                        capture_output=True, text=True, check=False)
  if done.returncode:
    raise RuntimeError(f"timm's loader failed:\n{done.stderr[-2000:]}")
  return tuple(float(v) for v in done.stdout.split()[-2:])


def timm_missing():
  """The first of torch, torchvision, timm (or tools/timm_loader.py, in a
  checkout only) that is not installed, or None."""
  return next((name for name in ('torch', 'torchvision', 'timm')
               if importlib.util.find_spec(name) is None),
              None if os.path.isfile(TIMM_LOADER) else TIMM_LOADER)


def benchmark_input(base_config=None, *, recipes: Sequence[str], folder: str,
                    image_size: int, batch_size: int, repeats: int,
                    num_batches: int, warmup_batches: int,
                    compare_timm: bool = False) -> list[dict[str, Any]]:
  """One row per timing of each recipe's pipeline on `folder`/train,
  alternating with timm's loader when `compare_timm`."""
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
                     'per_cpu_second': per_cpu_second,
                     'image_size': image_size, 'batch_size': batch_size})
  return rows


def format_input(rows: Sequence[dict[str, Any]]) -> str:
  """One line per timing; per recipe timed with timm, both medians and
  their ratios."""
  lines = [f'CPU: {processor_name()}, {cores()} cores']
  for r in rows:
    lines.append(
        f"{r['recipe']:>9} {r['loader']:>9}: {r['images_per_sec']:7.1f} "
        f"images/s, {r['per_core']:6.1f} per core, {r['per_cpu_second']:6.1f}"
        f" per CPU-second  ({r['image_size']}x{r['image_size']}, batch "
        f"{r['batch_size']})")
  for recipe in dict.fromkeys(r['recipe'] for r in rows
                              if r['loader'] == 'timm'):
    ours, timm = ([statistics.median(r[k] for r in rows
                                     if (r['recipe'], r['loader']) ==
                                     (recipe, loader))
                   for k in ('images_per_sec', 'per_cpu_second')]
                  for loader in ('mixer_jax', 'timm'))
    lines.append(f'{recipe:>9}: medians {ours[0]:.1f} images/s vs timm '
                 f'{timm[0]:.1f}: {ours[0] / timm[0]:.2f}x; per CPU-second '
                 f'{ours[1]:.1f} vs {timm[1]:.1f}: {ours[1] / timm[1]:.2f}x')
  return '\n'.join(lines)


# ------------------------------------------------------------ The command.


def define_flags() -> None:
  config_flags.DEFINE_config_file(
      'config', None, 'Training config (file.py[:ARG], --config.FIELD=VALUE '
      'overrides); default the package defaults, for --mode=loop '
      f'{QUICKSTART_CONFIG}.', lock_config=False)
  flags.DEFINE_string('variant', 'B_16', 'Mixer variant, e.g. B_16.')
  flags.DEFINE_enum('mode', 'infer', ('infer', 'train', 'both', 'loop',
                                      'input'), 'What to time (see --help).')
  flags.DEFINE_integer('loop_steps', 600, 'Steps per round of --mode=loop.')
  flags.DEFINE_list('batch_size', ['16'], 'Global batch size(s), e.g. 8,16.')
  flags.DEFINE_integer('image_size', 224, 'Square image side.')
  flags.DEFINE_enum('dtype', 'float32', ('float32', 'bfloat16'),
                    'Computation dtype of the model and the peak matmul.')
  flags.DEFINE_integer('repeats', 5, 'Timed steps (0: compile only); rounds '
                       'of --mode=loop; timings per loader of --mode=input.')
  flags.DEFINE_enum('optimizer', 'sgd', ('sgd', 'adam'), 'Train optimizer.')
  flags.DEFINE_integer('num_classes', 1000, 'Head size.')
  flags.DEFINE_integer('peak_size', 2048, 'Side of the peak matmul.')
  flags.DEFINE_integer('devices', 1, 'Devices of the mesh (fake CPU devices '
                       'when the machine has fewer).', lower_bound=1)
  flags.DEFINE_enum('sharding', 'replicate', ('replicate', 'fsdp'),
                    'Placement of parameters and optimizer state.')
  flags.DEFINE_bool('remat', False, 'Rematerialise each block in training.')
  flags.DEFINE_enum('recipe', 'both', ['both', 'finetune', 'inception'],
                    'Training preprocessing of --mode=input.')
  flags.DEFINE_integer('num_images', 1024, 'JPEGs --mode=input makes.')
  flags.DEFINE_integer('width', 500, 'Width of the made images.')
  flags.DEFINE_integer('height', 375, 'Height of the made images.')
  flags.DEFINE_integer('num_batches', 20, 'Batches --mode=input times.',
                       lower_bound=1)
  flags.DEFINE_integer('warmup_batches', 3, 'Batches --mode=input runs '
                       'first.', lower_bound=0)
  flags.DEFINE_string('data', '', 'Folder of --mode=input images (made when '
                      'it has no train/); default a temporary one.')
  flags.DEFINE_bool('compare_timm', False, "--mode=input: also time timm's "
                    'loader (needs torch, torchvision, timm).')
  flags.DEFINE_bool('json', False, 'One JSON object per line, no table.')
  command_line.define_verbose_flag()
  for name in SIZE_FLAGS:
    flags.DEFINE_integer(name, None, f"Override the variant's {name}.")


def main(argv: Sequence[str]) -> None:
  f = flags.FLAGS
  command_line.set_up_output(f.verbose)
  # User errors are one line (exit 1); anything else keeps its traceback.
  with command_line.user_errors_as_one_line():
    if len(argv) > 1:
      raise errors.UsageError(f'Unexpected arguments: {argv[1:]}')
    try:
      batch_sizes = [int(b) for b in f.batch_size]
    except ValueError as e:
      raise errors.UsageError(
          f'--batch_size must be integers, e.g. 8,16: {e}') from None
    if f.mode == 'input':
      rows, formatted = _input_from_flags(f, batch_sizes), format_input
    else:
      import jax  # pylint: disable=g-import-not-at-top
      # Before JAX starts its CPU backend: --devices' fake devices.
      jax.config.update('jax_num_cpu_devices', f.devices)
      if f.mode == 'loop':
        command_line.load_tensorflow_quietly()  # The run reads its data.
        rows = [benchmark_loop(f.config, steps=f.loop_steps,
                               rounds=f.repeats)]
        formatted = lambda rows: format_loop(rows[0])
      else:
        rows, formatted = _steps_from_flags(f, batch_sizes), format_table
  print('\n'.join(json.dumps(row) for row in rows) if f.json
        else formatted(rows), flush=True)


def _steps_from_flags(f, batch_sizes):
  from mixer_jax import models  # pylint: disable=g-import-not-at-top
  sizes = {k: f[k].value for k in SIZE_FLAGS if f[k].value is not None}
  try:  # The variant and size flags, checked before anything is built.
    models.get_spec(f.variant, **sizes)
  except ValueError as e:
    raise errors.UsageError(f'--variant={f.variant}: {e}') from None
  # The config's loss, mixup, clipping, weight decay and mesh are kept.
  config = with_fields(
      f.config, model__variant=f.variant, model__dtype=f.dtype,
      model__remat=f.remat, num_classes=f.num_classes, optimizer=f.optimizer,
      image_size=f.image_size, sharding=f.sharding,
      **{f'model__{k}': v for k, v in sizes.items()})
  return [benchmark_config(with_fields(config, batch_size=batch_size), mode,
                           repeats=f.repeats, devices=f.devices,
                           peak_size=f.peak_size)
          for batch_size in batch_sizes
          for mode in (('infer', 'train') if f.mode == 'both' else (f.mode,))]


def _input_from_flags(f, batch_sizes):
  if f.repeats < 1:
    raise errors.UsageError('--mode=input needs --repeats >= 1.')
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
    return [row for batch_size in batch_sizes for row in benchmark_input(
        f.config, recipes=(['finetune', 'inception'] if f.recipe == 'both'
                           else [f.recipe]),
        folder=root, image_size=f.image_size, batch_size=batch_size,
        repeats=f.repeats, num_batches=f.num_batches,
        warmup_batches=f.warmup_batches,
        compare_timm=f.compare_timm and not missing)]
  finally:
    if not f.data:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
  define_flags()
  app.run(main)
