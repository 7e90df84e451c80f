"""Images/s of the 224x224 training input pipeline on locally made JPEGs.

  python -m mixer_jax.benchmark_input                 # both recipes
  python -m mixer_jax.benchmark_input --recipe=finetune --batch_size=128
  python -m mixer_jax.benchmark_input --config=configs/mixer_i1k.py:B_16
  python -m mixer_jax.benchmark_input --recipe=inception --compare_timm

`--config` (default: the package's defaults, mixer_jax/config_defaults.py)
supplies every setting the flags below do not override.

Writes `--num_images` synthetic photos (smooth colour fields plus noise,
`--width` x `--height`, JPEG quality 90: about the size and decode cost of
an average ImageNet image) as a folder data set in a temporary directory,
then times `input_pipeline.train_dataset` over it after a short warm-up.
The default 1,024 images make 16 batches of 64 per epoch, so that epoch
ends (where timm's DataLoader drains and refills) are rare in the timing.
Compare the figure with the model's training images/s on the same machine
(`python -m mixer_jax.benchmark`): if it is lower, input sets the pace.

Recipes: 'finetune' = random crop + resize + flip (official fine-tuning);
'inception' = the same crop + flip + RandAugment(2, 15) (ImageNet
pretraining; its mixup runs in the train step, not in the input pipeline).
Every pipeline step runs, JPEG decoding included (decoded only inside the
crop); epochs cycle over the files, so the OS file cache serves them after
the first pass, as on a machine with enough RAM.

Each timing gives images/s; images/s per core, the cores being those this
process may run on (`os.sched_getaffinity`), which tf.data uses all of;
and images per CPU-second, over the CPU time the loader's threads (and,
for timm, its worker processes) used. On a machine shared with other jobs
the scheduler decides how much of the cores each loader gets, so images/s
swing; the per-CPU-second figure much less.

`--compare_timm` (needs torch, torchvision and timm; skipped with a message
otherwise) also times PyTorch's loader on the same files, same cores, same
batch size, in the same run: torchvision's ImageFolder with
`timm.data.create_transform(image_size, is_training=True)` (random resized
crop, flip; plus `auto_augment='rand-m15-n2'` for the inception recipe) and
a DataLoader with one worker process per core. The two alternate
`--repeats` times, each from a fresh iterator after the same warm-up, so
that load from other processes falls on both; the last line gives the
medians of both figures and their ratios.
"""

# First, before TensorFlow loads: it quiets TensorFlow's C++ start-up lines.
from mixer_jax.training import command_line  # pylint: disable=g-bad-import-order
command_line.load_tensorflow_quietly()  # Reads data sets: TF is needed.

import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np
import tensorflow as tf

from mixer_jax import config_defaults
from mixer_jax.data import input_pipeline
from mixer_jax.training import errors
from mixer_jax.training import throughput

FLAGS = flags.FLAGS

def _define_flags():
  """Defines the command-line flags (only when run as a program)."""
  config_flags.DEFINE_config_file(
      'config', None, 'Base config file (file.py[:ARG]); default the '
      "package's defaults (mixer_jax/config_defaults.py).", lock_config=False)
  flags.DEFINE_enum('recipe', 'both', ['both', 'finetune', 'inception'],
                    'Training preprocessing to time.')
  flags.DEFINE_integer('num_images', 1024, 'JPEG files to make (about 5 MB '
                       'per 100 at 500x375).')
  flags.DEFINE_integer('width', 500, 'Width of the made images.')
  flags.DEFINE_integer('height', 375, 'Height of the made images.')
  flags.DEFINE_integer('image_size', 224, 'Training image side.')
  flags.DEFINE_integer('batch_size', 64, 'Batch size.')
  flags.DEFINE_integer('num_batches', 20, 'Batches timed.')
  flags.DEFINE_integer('warmup_batches', 3, 'Batches run before timing starts.')
  flags.DEFINE_string('data', '', 'Folder for the images; default a '
                      'temporary one, deleted afterwards.')
  flags.DEFINE_bool('compare_timm', False, "Also time timm's loader on the "
                    'same files and cores (needs torch, torchvision, timm).')
  flags.DEFINE_integer('repeats', 3, 'Timings per loader (alternating).')
  command_line.define_verbose_flag()


def make_jpegs(root, num_images, width, height, num_classes=10, seed=0):
  """Writes root/train/class_k/i.jpg synthetic photos; returns bytes/image."""
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
    image = tf.cast(tf.clip_by_value(noisy, 0, 255), tf.uint8)
    data = tf.io.encode_jpeg(image, quality=90).numpy()
    with open(os.path.join(folder, f'{i}.jpg'), 'wb') as f:
      f.write(data)
    total += len(data)
  return total / max(num_images, 1)


def recipe_config(base, recipe, folder, image_size, batch_size):
  """A copy of config `base` reading `folder`, with one recipe's pp fields."""
  config = base.copy_and_resolve_references()
  config.dataset = 'folder'
  config.folder = folder
  config.train_split = 'train'
  config.num_classes = -1
  config.image_size = image_size
  config.batch_size = batch_size
  config.shuffle_buffer = 1_000
  config.pp.train_crop = recipe
  if recipe == 'finetune':
    config.pp.randaugment_layers = 0
  else:
    config.pp.randaugment_layers = 2
    config.pp.randaugment_magnitude = 15
  return config


def cores():
  """CPU cores this process may run on (all of them where unknown)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    return os.cpu_count()


def images_per_second(config, num_batches, warmup_batches):
  """Times the training pipeline of `config` on this process alone.

  Returns:
    (images/s, images per CPU-second): the second divides by the CPU time
    all of this process's threads used, which other processes on the
    machine do not change as much as they change the first.
  """
  ds = input_pipeline.train_dataset(config, process_index=0,
                                    process_count=1)
  # as_numpy_iterator: each batch is complete and on the host, as the
  # trainer receives it.
  iterator = ds.as_numpy_iterator()
  for _ in range(warmup_batches):
    next(iterator)
  start, cpu = time.perf_counter(), time.process_time()
  for _ in range(num_batches):
    next(iterator)
  images = num_batches * config.batch_size
  return (images / (time.perf_counter() - start),
          images / (time.process_time() - cpu))


# timm's loader, timed in a child interpreter: PyTorch and TensorFlow loaded
# into one process can crash it (their bundled native libraries clash), so
# the child imports neither TensorFlow nor mixer_jax. It prints images/s
# and images per CPU-second of itself and its workers (psutil counts them;
# 'nan' without psutil).
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
# Persistent workers: no process start-up at each epoch's end.
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
TIMM_PACKAGES = ('torch', 'torchvision', 'timm')


def timm_missing():
  """The first of torch, torchvision, timm that is not installed, or None."""
  for name in TIMM_PACKAGES:
    if importlib.util.find_spec(name) is None:
      return name
  return None


def timm_images_per_second(folder, recipe, image_size, batch_size, workers,
                           num_batches, warmup_batches):
  """(images/s, images per CPU-second) of timm's loader (child process).

  ImageFolder + `timm.data.create_transform(image_size, is_training=True)`
  (plus `auto_augment='rand-m15-n2'` for recipe 'inception'), a DataLoader
  with `workers` worker processes, shuffled, timed after warmup_batches.
  """
  args = [folder, recipe] + [str(v) for v in (
      image_size, batch_size, workers, num_batches, warmup_batches)]
  done = subprocess.run([sys.executable, '-c', _TIMM_CHILD, *args],
                        capture_output=True, text=True, check=False)
  if done.returncode:
    raise RuntimeError(f"timm's loader failed:\n{done.stderr[-2000:]}")
  return tuple(float(v) for v in done.stdout.split()[-2:])


def _line(name, rate, per_cpu_second, cores_used, note):
  print(f'{name:>9}: {rate:7.1f} images/s, {rate / cores_used:6.1f} per core, '
        f'{per_cpu_second:6.1f} per CPU-second  ({note})', flush=True)


def compare(config, recipe, folder, *, repeats, num_batches, warmup_batches,
            with_timm=False):
  """Times our pipeline, alternating with timm's loader when with_timm.

  Prints every timing and, when timm ran, the medians and their ratios.

  Returns:
    (ours, timm's): lists of (images/s, images per CPU-second), `repeats`
    each; timm's is empty without with_timm or without timm.
  """
  n = cores()
  missing = timm_missing() if with_timm else None
  if missing:
    print(f'timm comparison skipped: {missing} is not installed (pip '
          'install torch torchvision timm).', flush=True)
  ours, theirs = [], []
  for _ in range(repeats):
    ours.append(images_per_second(config, num_batches, warmup_batches))
    _line(recipe, *ours[-1], n, f'{config.image_size}x{config.image_size}, '
          f'batch {config.batch_size}, {n} cores')
    if with_timm and not missing:
      theirs.append(timm_images_per_second(
          folder, recipe, config.image_size, config.batch_size, n,
          num_batches, warmup_batches))
      _line('timm', *theirs[-1], n, f'{n} DataLoader workers')
  if theirs:
    mine = [statistics.median(r) for r in zip(*ours)]
    other = [statistics.median(r) for r in zip(*theirs)]
    print(f'{recipe:>9}: medians {mine[0]:.1f} images/s vs timm '
          f'{other[0]:.1f}: {mine[0] / other[0]:.2f}x; per CPU-second '
          f'{mine[1]:.1f} vs {other[1]:.1f}: {mine[1] / other[1]:.2f}x',
          flush=True)
  return ours, theirs


def main(argv):
  command_line.set_up_output(FLAGS.verbose)
  if len(argv) > 1:
    raise SystemExit(command_line.one_line(errors.UsageError(
        f'Unexpected arguments: {argv[1:]}.')))
  recipes = (['finetune', 'inception'] if FLAGS.recipe == 'both'
             else [FLAGS.recipe])
  with tempfile.TemporaryDirectory() as tmp:
    root = FLAGS.data or tmp
    if not os.path.isdir(os.path.join(root, 'train')):
      size = make_jpegs(root, FLAGS.num_images, FLAGS.width, FLAGS.height)
      print(f'Made {FLAGS.num_images} JPEGs of {FLAGS.width}x'
            f'{FLAGS.height}, {size / 1024:.0f} KiB each, in {root}')
    print(f'CPU: {throughput.processor_name()}, {cores()} cores for this process')
    for recipe in recipes:
      config = recipe_config(FLAGS.config or config_defaults.get_config(),
                             recipe, root, FLAGS.image_size,
                             FLAGS.batch_size)
      compare(config, recipe, root, repeats=FLAGS.repeats,
              num_batches=FLAGS.num_batches,
              warmup_batches=FLAGS.warmup_batches,
              with_timm=FLAGS.compare_timm)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
