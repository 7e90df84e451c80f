"""Images/s of the 224x224 training input pipeline on locally made JPEGs.

  python -m mixer_jax.benchmark_input                 # both recipes
  python -m mixer_jax.benchmark_input --recipe=finetune --batch_size=128
  python -m mixer_jax.benchmark_input --config=path/to/configs/common.py

`--config` (default configs/common.py, from the repository root) supplies
every setting the flags below do not override.

Writes `--num_images` synthetic photos (smooth colour fields plus noise,
`--width` x `--height`, JPEG quality 90: about the size and decode cost of
an average ImageNet image) as a folder data set in a temporary directory,
then times `input_pipeline.train_dataset` over it after a short warm-up.
Compare the figure with the model's training images/s on the same machine
(`python -m mixer_jax.benchmark`): if it is lower, input sets the pace.

Recipes: 'finetune' = random crop + resize + flip (official fine-tuning);
'inception' = the same crop + flip + RandAugment(2, 15) (ImageNet
pretraining; its mixup runs in the train step, not in the input pipeline). Every pipeline step runs, JPEG decoding included (decoded only
inside the crop); epochs cycle over the files, so the OS file cache serves
them after the first pass, as on a machine with enough RAM.
"""

# First, before TensorFlow loads: it quiets TensorFlow's C++ start-up lines.
from mixer_jax.training import command_line  # pylint: disable=g-bad-import-order
command_line.load_tensorflow_quietly()  # Reads data sets: TF is needed.

import os
import tempfile
import time

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np
import tensorflow as tf

from mixer_jax.data import input_pipeline
from mixer_jax.training import errors

FLAGS = flags.FLAGS

def _define_flags():
  """Defines the command-line flags (only when run as a program)."""
  config_flags.DEFINE_config_file(
      'config', 'configs/common.py', 'Base config file.', lock_config=False)
  flags.DEFINE_enum('recipe', 'both', ['both', 'finetune', 'inception'],
                    'Training preprocessing to time.')
  flags.DEFINE_integer('num_images', 256, 'JPEG files to make.')
  flags.DEFINE_integer('width', 500, 'Width of the made images.')
  flags.DEFINE_integer('height', 375, 'Height of the made images.')
  flags.DEFINE_integer('image_size', 224, 'Training image side.')
  flags.DEFINE_integer('batch_size', 64, 'Batch size.')
  flags.DEFINE_integer('num_batches', 20, 'Batches timed.')
  flags.DEFINE_integer('warmup_batches', 3, 'Batches run before timing starts.')
  flags.DEFINE_string('data', '', 'Folder for the images; default a '
                      'temporary one, deleted afterwards.')
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


def images_per_second(config, num_batches, warmup_batches):
  """Times the training pipeline of `config` on this process alone."""
  ds = input_pipeline.train_dataset(config, process_index=0,
                                    process_count=1)
  iterator = iter(ds)
  for _ in range(warmup_batches):
    next(iterator)
  start = time.perf_counter()
  for _ in range(num_batches):
    batch = next(iterator)
  batch['image'].numpy()  # Wait for the last batch to be complete.
  seconds = time.perf_counter() - start
  return num_batches * config.batch_size / seconds


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
    for recipe in recipes:
      config = recipe_config(FLAGS.config, recipe, root, FLAGS.image_size,
                             FLAGS.batch_size)
      rate = images_per_second(config, FLAGS.num_batches, FLAGS.warmup_batches)
      print(f'{recipe:>9}: {rate:7.1f} images/s  ({FLAGS.image_size}x'
            f'{FLAGS.image_size}, batch {FLAGS.batch_size}, '
            f'{os.cpu_count()} CPUs)', flush=True)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
