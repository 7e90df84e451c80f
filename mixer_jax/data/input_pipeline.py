"""tf.data input pipelines for training and evaluation.

Batches are dicts: 'image' float32 (B, H, W, 3) in [-1, 1], 'label' float32
(B, num_classes) one-hot (mixup runs in the train step) and, for eval,
'mask' float32 (B,), 1 for real examples. B = batch_size // process_count:
each process reads only its own shard (datasets/sources.py).

Training order and augmentation are functions of (config.seed, process,
position), never of iterator state: epoch e of the shard is shuffled with a
seed from (seed, process, e), example p of the stream is augmented with one
from (seed, process, p). So `train_dataset(config, start_step=k)` starts at
epoch k*B // n, skips the first k*B % n raw records of it before any decode,
and yields exactly the batches of an uninterrupted run from batch k on.
"""

import dataclasses
import math

import tensorflow as tf

from mixer_jax.data import preprocess
from mixer_jax.data import randaugment as ra
from mixer_jax.data.datasets import sources

# Largest int64 epoch index: the training stream never ends.
_FOREVER = 2**62
# Salts that keep the per-purpose random streams independent.
_SHUFFLE, _AUGMENT = 1, 2
_OPTIONS = tf.data.Options()
_OPTIONS.deterministic = True  # Parallel maps keep their input order.


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer needs to know about a data set (examples counted over
  all processes; skipped_images: corrupt files config.bad_images='skip' left
  out of both splits)."""
  num_classes: int  # The head size (`head_classes`).
  train_examples: int
  eval_examples: int
  skipped_images: int = 0


def _processes(process_index, process_count):
  """This process's index and the process count (default JAX's)."""
  import jax  # pylint: disable=g-import-not-at-top
  return (jax.process_index() if process_index is None else process_index,
          jax.process_count() if process_count is None else process_count)


def _local_batch_size(batch_size, process_count):
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(
        f'config.batch_size={batch_size} must be a positive multiple of the '
        f'number of processes ({process_count}).')
  return batch_size // process_count


def head_classes(config, source) -> int:
  """The head size: config.num_classes, or the data set's when it is -1.

  The one place that resolves it; raises ValueError when the data set has
  no class count or more classes than the head.
  """
  if config.num_classes == -1:
    if source.num_classes <= 0:
      raise ValueError(
          f'num_classes=-1 but {source.name} does not say how many classes '
          'it has; set config.num_classes to the number of labels.')
    return source.num_classes
  if config.num_classes < source.num_classes:
    raise ValueError(
        f'num_classes={config.num_classes} but {source.name} has '
        f'{source.num_classes} classes, so labels up to '
        f'{source.num_classes - 1} would not fit the head; use -1 to take '
        f'the count from the data, or a value >= {source.num_classes}.')
  return config.num_classes


def dataset_info(config):
  """The DatasetInfo of the configured data set."""
  source = sources.get_source(config)
  skipped = 0
  if isinstance(source, sources.FolderSource):
    skipped = (source.skipped(config.train_split) +
               source.skipped(config.eval_split))
  return DatasetInfo(
      num_classes=head_classes(config, source),
      train_examples=source.num_examples(config.train_split),
      eval_examples=source.num_examples(config.eval_split),
      skipped_images=skipped)


def _seed(config, process_index, salt):
  """A (2,) int64 seed for one purpose of one process."""
  return tf.constant([config.seed, process_index * 16 + salt], tf.int64)


def _decoded(examples):
  return examples.map(lambda ex: {'image': preprocess.decode(ex['image']),
                                  'label': ex['label']},
                      num_parallel_calls=tf.data.AUTOTUNE)


def _cache(examples, *, decoded, raw=False):
  """Caches examples in memory, decoded (config.cache) or still encoded
  (config.cache_raw: no file is read after the first epoch, yet decoding and
  augmentation still differ per epoch)."""
  if decoded:
    examples = _decoded(examples)
  return examples.cache() if decoded or raw else examples


def train_dataset(config, *, start_step=0, process_index=None,
                  process_count=None):
  """Infinite, shuffled, augmented training batches of this process, from
  batch `start_step` of an uninterrupted run on."""
  index, count = _processes(process_index, process_count)
  batch_size = _local_batch_size(config.batch_size, count)
  source = sources.get_source(config)
  num_classes = head_classes(config, source)
  split = config.train_split
  n = source.shard_size(split, index, count)
  if n <= 0:
    raise ValueError(
        f'Process {index} of {count} gets no examples of {split!r} in '
        f'{source.name}; use a larger split or fewer processes.')
  examples = _cache(source.read(split, index, count), decoded=config.cache,
                    raw=config.cache_raw)

  shuffle_seed = _seed(config, index, _SHUFFLE)
  buffer_size = min(config.shuffle_buffer, n)

  per_batch = batched_preprocessing(config, source)

  def epoch(e):
    ds = examples
    if buffer_size > 1:
      seed = tf.random.stateless_uniform(  # One int64 from (seed, e).
          [], tf.random.experimental.stateless_fold_in(shuffle_seed, e),
          minval=None, maxval=None, dtype=tf.int64)
      ds = ds.shuffle(buffer_size, seed=seed, reshuffle_each_iteration=False)
    if per_batch:
      return ds
    # Each example tagged with its position: its augmentation's seed.
    return ds.enumerate().map(lambda i, ex: (e * n + i, ex))

  first_epoch, offset = divmod(start_step * batch_size, n)
  ds = tf.data.Dataset.range(first_epoch, _FOREVER).flat_map(epoch)
  ds = ds.skip(offset)  # Raw records: nothing skipped is decoded.

  augment_seed = _seed(config, index, _AUGMENT)
  pp = config.pp
  randaugment = (None if pp.randaugment_layers <= 0 else
                 ra.RandAugment(pp.randaugment_layers,
                                pp.randaugment_magnitude))

  def augment(position, ex):
    seed = tf.random.experimental.stateless_fold_in(augment_seed, position)
    image = preprocess.train_image(
        ex['image'], seed, image_size=config.image_size, crop=pp.train_crop,
        area_min=pp.crop_area_min, flip=pp.flip, randaugment=randaugment)
    return image, tf.one_hot(ex['label'], num_classes)

  if per_batch:
    image_spec = ds.element_spec['image']
    if image_spec.dtype != tf.uint8 or image_spec.shape[-1:] != [3]:
      ds = _decoded(ds)  # Not cached decoded.
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.map(lambda ex: (
        preprocess.normalize(preprocess.resize(ex['image'], config.image_size)),
        tf.one_hot(ex['label'], num_classes)))
  else:
    ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=True)

  ds = ds.map(lambda images, labels: {'image': images, 'label': labels})
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_OPTIONS)


def batched_preprocessing(config, source) -> bool:
  """Whether training images are resized and scaled a batch at a time.

  Possible (with the same values) when nothing is drawn per image and the
  data set declares one image size; on 8x8 digits the per-image `map` costs
  about 70 us of CPU per image, mostly op dispatch, against about 6 us.
  """
  pp = config.pp
  return (pp.train_crop == 'resize' and not pp.flip and
          pp.randaugment_layers <= 0 and
          source.image_size is not None)


def eval_dataset(config, *, process_index=None, process_count=None):
  """`eval_batches` of config.eval_split of the run's data set."""
  source = sources.get_source(config)
  pp = config.pp
  return eval_batches(
      source, config.eval_split, batch_size=config.batch_size,
      image_size=config.image_size,
      num_classes=head_classes(config, source), crop=pp.eval_crop,
      resize=pp.eval_resize, resize_method=pp.eval_resize_method,
      cache=config.cache, process_index=process_index,
      process_count=process_count)


def eval_batches(source, split, *, batch_size, image_size, num_classes,
                 crop, resize, resize_method, multi_label=False, cache=False,
                 process_index=None, process_count=None):
  """One pass over `split` of `source` for this process, padded.

  Every example is in exactly one process's batches with mask 1; zero
  images with mask 0 fill the last ones, so that all processes yield
  ceil(largest shard / B) full batches. `multi_label`: labels are sets
  (ImageNet ReaL's `real_label`), one multi-hot vector each; an empty set
  gets mask 0, out of every metric.
  """
  index, count = _processes(process_index, process_count)
  batch_size = _local_batch_size(batch_size, count)
  largest = max(source.shard_size(split, i, count) for i in range(count))
  if largest <= 0:
    raise ValueError(f'Split {split!r} of {source.name} is empty.')
  examples = _cache(source.read(split, index, count), decoded=cache)

  def prepare(ex):
    if multi_label:
      labels = tf.reshape(tf.cast(ex['label'], tf.int32), [-1])
      label = tf.minimum(tf.reduce_sum(
          tf.one_hot(labels, num_classes, dtype=tf.float32), axis=0), 1.0)
      mask = tf.cast(tf.size(labels) > 0, tf.float32)
    else:
      label = tf.one_hot(ex['label'], num_classes)
      mask = tf.constant(1.0, tf.float32)
    return {'image': preprocess.eval_image(ex['image'], image_size, crop,
                                           resize, resize_method),
            'label': label, 'mask': mask}

  ds = examples.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  padding = tf.data.Dataset.from_tensors({
      'image': tf.zeros([image_size, image_size, 3], tf.float32),
      'label': tf.zeros([num_classes], tf.float32),
      'mask': tf.constant(0.0, tf.float32),
  }).repeat()
  ds = ds.concatenate(padding).take(math.ceil(largest / batch_size) *
                                    batch_size)
  ds = ds.batch(batch_size, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_OPTIONS)
