"""Where examples come from: TFDS data sets by name (`TfdsSource`) or folders
of images (`FolderSource`, through tfds.ImageFolder).

A source hands the input pipeline one process's contiguous shard of a split
as {'image', 'label'} in a fixed order, 'image' still encoded where the data
set stores it so (crops are decoded alone), 'label' an int64 class index.
"""

import contextlib
import fcntl
import functools
import io
import logging
import os
import socket
import sys
import textwrap
import urllib.parse
import urllib.request

from typing import List, Optional

import tensorflow as tf
import tensorflow_datasets as tfds

from mixer_jax.data.errors import BadImagesError  # pylint: disable=g-importing-member
from mixer_jax.data.errors import DatasetUnavailableError  # pylint: disable=g-importing-member
from mixer_jax.data.errors import FolderLayoutError  # pylint: disable=g-importing-member

_LAYOUT = 'root/split_name/class_name/*.jpg|jpeg|png'


def _is_image(name):  # What tfds.ImageFolder reads.
  return name.lower().endswith(('.jpg', '.jpeg', '.png'))


def _listed(items, shown=10):
  """The first `shown` items, one per indented line, and how many more."""
  more = len(items) - shown
  return '\n  ' + '\n  '.join(items[:shown]) + (
      f'\n  ... and {more} more' if more > 0 else '')


def _images_below(folder):
  return sum(sum(_is_image(f) for f in files)
             for _, _, files in tf.io.gfile.walk(folder))


def check_folder_layout(root):
  """Messages, each naming a folder and what to do, for the layout problems
  of the image folder `root` that ImageFolder silently accepts.

  ImageFolder takes the class names from the folders of every split and
  reads only root/split/class/*.jpg|jpeg|png, so an empty class folder or a
  class folder in one split only adds a class the model is not trained (or
  tested) on, and images elsewhere are silently left out.
  """
  problems = []
  join, isdir = os.path.join, tf.io.gfile.isdir
  listdir = lambda d: sorted(e.rstrip('/') for e in tf.io.gfile.listdir(d))
  classes = {}  # split -> class folders with images.
  real_splits = []  # Split folders with a class folder (ImageFolder's).
  for split in [d for d in listdir(root) if isdir(join(root, d))]:
    split_dir = join(root, split)
    classes[split] = set()
    for name in listdir(split_dir):
      path = join(split_dir, name)
      if not isdir(path):
        if _is_image(name):
          problems.append(
              f'{path} is not in a class folder and would be ignored: move '
              f'it into {split_dir}/CLASS_NAME/.')
        continue
      if split not in real_splits:
        real_splits.append(split)
      entries = listdir(path)
      images = sum(_is_image(e) and not isdir(join(path, e)) for e in entries)
      for sub in [e for e in entries if isdir(join(path, e))]:
        nested = _images_below(join(path, sub))
        if nested:
          problems.append(
              f'{join(path, sub)} holds {nested} image(s) in a nested folder, '
              f'which would be ignored (only {_LAYOUT} is read): move them '
              f'up into {path}, or make {sub} a class folder of {split_dir}.')
      if images:
        classes[split].add(name)
      else:
        problems.append(
            f'Class folder {path} has no .jpg/.jpeg/.png images, but would '
            'still count as a class: add images or remove the folder.')
  everywhere = set.union(set(), *classes.values())
  for split in real_splits:
    for name in sorted(everywhere - classes[split]):
      present = [s for s in real_splits if name in classes[s]]
      if not isdir(join(root, split, name)):
        problems.append(
            f'Class {name!r} has images in {", ".join(present)} but no '
            f'folder {join(root, split, name)}: every split must have the '
            'same class folders (ImageFolder takes the classes of all '
            f'splits). Add {join(root, split, name)}/ with images, or '
            f'remove {name!r} from the other splits.')
  return problems


def _unreachable_host(url, timeout=5.0):
  """The host of `url` if no TCP connection to it opens, else None."""
  parsed = urllib.parse.urlparse(url)
  if not parsed.hostname or urllib.request.getproxies():
    return None  # Behind a proxy a direct connection proves nothing.
  port = parsed.port or (443 if parsed.scheme == 'https' else 80)
  try:
    socket.create_connection((parsed.hostname, port), timeout=timeout).close()
  except OSError:
    return parsed.hostname
  return None


def shard_range(num_examples, index, count):
  """[start, end) of process `index` of `count` in a split of num_examples.

  Folder data sets only: their splits are counted without the bad files,
  which TFDS's `even_splits` would count.
  """
  return num_examples * index // count, num_examples * (index + 1) // count


def _absolute_ranges(split, sizes):
  """[(split name, start, end)] that the split string `split` selects, for
  splits of `sizes` ({name: number of examples}).

  TFDS has no public function that resolves a split string against sizes
  other than a prepared data set's (here: a folder's images less its corrupt
  files), so this is the one place that builds TFDS's SplitDict/SplitInfo
  and reads the fields of `ReadInstruction.to_absolute`'s results
  (tensorflow-datasets 4.9). Raises ValueError for a bad split string.
  """
  try:
    spec = (tfds.core.ReadInstruction(split) if split in sizes
            else tfds.core.ReadInstruction.from_spec(split))
  except (ValueError, AssertionError) as e:
    raise ValueError(f'Cannot parse split {split!r}: {e}') from e
  split_dict = tfds.core.SplitDict([
      tfds.core.SplitInfo(name=name, shard_lengths=[size], num_bytes=0)
      for name, size in sizes.items()])
  try:
    return [(i.splitname, i.from_ or 0, sizes[i.splitname] if i.to is None
             else i.to) for i in spec.to_absolute(split_dict)]
  except (ValueError, AssertionError, KeyError) as e:
    raise _UnknownSplit(str(e)) from e


class _UnknownSplit(ValueError):
  """A split string naming a split that `sizes` does not have."""


@contextlib.contextmanager
def _build_lock(data_dir_root, name):
  """Holds an exclusive lock on `data_dir_root/.NAME.build.lock` (local
  paths only). The kernel frees a `flock` when its holder exits in any way,
  so a killed build never blocks the next one."""
  root = os.fspath(data_dir_root)
  if '://' in root:
    yield
    return
  if not os.path.isdir(root):
    logging.warning('data_dir %s does not exist; creating it.', root)
  os.makedirs(root, exist_ok=True)
  fd = os.open(os.path.join(root, f'.{name}.build.lock'),
               os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      print(f'Waiting for another job that is preparing {name} in {root}...',
            file=sys.stderr, flush=True)
      fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)  # Also releases the lock.


def class_label(info, label_key=None):
  """The ClassLabel of a TFDS data set's label, or None when it has none.

  The label is the feature `label_key`, default the supervised label; a
  Sequence(ClassLabel) (ImageNet ReaL's set of labels) gives its ClassLabel.
  """
  key = label_key or (info.supervised_keys or ('image', 'label'))[1]
  feature = info.features[key] if key in info.features else None
  feature = getattr(feature, 'feature', feature)
  return feature if isinstance(feature, tfds.features.ClassLabel) else None


class TfdsSource:
  """A TFDS data set, by name, in `data_dir` (None: TFDS's default).

  Its labels are the data set's supervised label, or the feature
  `label_key` (e.g. ImageNet ReaL's `real_label`, a set of labels per image;
  `num_classes` is then that of the set's ClassLabel).
  """

  def __init__(self, name, data_dir=None, label_key=None):
    try:
      self.builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError as e:
      raise DatasetUnavailableError(
          f'TFDS knows no data set named {name!r} (config.dataset). Use a '
          "name from tfds.list_builders(), 'digits' (built in) or 'folder' "
          'with config.folder pointing at class_name/*.jpg folders.') from e
    self.name = name
    self._prepare()
    features = self.builder.info.features
    self.image_key, self.label_key = (
        self.builder.info.supervised_keys or ('image', 'label'))
    if label_key is not None:
      if label_key not in features:
        raise ValueError(f'{name} has no feature {label_key!r} (config.evals '
                         f'label_key); it has {sorted(features)}.')
      self.label_key = label_key
    if self.image_key not in features or self.label_key not in features:
      raise DatasetUnavailableError(
          f'{name!r} has no ({self.image_key!r}, {self.label_key!r}) '
          'features; mixer_jax needs an image classification data set.')
    label = class_label(self.builder.info, self.label_key)
    self.num_classes = label.num_classes if label else -1
    self.class_names = label.names if label else None
    # Keep encoded images encoded: preprocessing crops JPEGs while decoding.
    self._decoders = ({self.image_key: tfds.decode.SkipDecoding()}
                      if isinstance(features[self.image_key],
                                    tfds.features.Image) else None)
    # (height, width) when the data set declares every image's size (digits,
    # CIFAR), else None (ImageNet, whose images differ).
    height, width, *_ = features[self.image_key].shape + (None, None)
    self.image_size = ((height, width) if height and width else None)

  def _prepare(self):
    """Downloads and prepares the data set unless it already is; jobs
    started together on a fresh data_dir (a seed sweep) take turns."""
    if self.builder.is_prepared():
      return
    with _build_lock(self.builder.data_dir_root, self.name):
      # Another job may have built it while this one waited.
      self.builder = tfds.builder(self.name,
                                  data_dir=self.builder.data_dir_root)
      if self.builder.is_prepared():
        return
      self._build()

  def _build(self):
    builder = self.builder
    # Without a network, TFDS retries each download for minutes; a quick
    # look at the first download host fails at once instead.
    urls = list(builder.url_infos or ())
    if urls and not builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
      host = _unreachable_host(urls[0])
      if host:
        raise self._unavailable(f'cannot reach {host} to download it')
    print(f'Preparing data set {self.name} in {builder.data_dir_root} '
          '(first use only)...', file=sys.stderr, flush=True)
    tfds.disable_progress_bar()  # Escape-code bars in logs and pipes.
    try:
      # TFDS prints its "Downloading and preparing dataset ..." banners to
      # stdout, where the programs' answers go; they are logged instead.
      banners = io.StringIO()
      with contextlib.redirect_stdout(banners):
        builder.download_and_prepare()
      for line in banners.getvalue().splitlines():
        logging.info('%s', line)
    except Exception as e:  # pylint: disable=broad-except
      # Preparation fails in many ways (no network, missing manual files,
      # full disk); the original error is chained below.
      reason = (f'{type(e).__name__}: {str(e)[:300]}'
                if not builder.MANUAL_DOWNLOAD_INSTRUCTIONS else
                'its manual download is missing or incomplete')
      raise self._unavailable(reason) from e

  def _unavailable(self, reason):
    builder = self.builder
    where = builder.data_dir
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
      manual = os.path.join(builder.data_dir_root, 'downloads', 'manual')
      how = (f'{self.name} must be downloaded by hand into {manual} '
             '(or a manual_dir passed to `tfds build --manual_dir`):\n'
             f'{textwrap.dedent(builder.MANUAL_DOWNLOAD_INSTRUCTIONS).strip()}'
             '\nThe next run prepares it (or run `tfds build '
             f'{self.name} --data_dir={builder.data_dir_root}`).')
    else:
      how = (f'Run `tfds build {self.name} --data_dir=DATA_DIR` on a '
             'machine with network access and copy DATA_DIR here, then '
             'set config.data_dir=DATA_DIR.')
    return DatasetUnavailableError(
        f'TFDS data set {self.name!r} is not prepared in {where} and could '
        f'not be prepared ({reason}). {how}')

  def split_sizes(self):
    return {name: int(info.num_examples)
            for name, info in self.builder.info.splits.items()}

  def num_examples(self, split):
    """Number of examples in a split string such as 'train[:98%]'."""
    return int(self.builder.info.splits[split].num_examples)

  def shard_size(self, split, index, count):
    """Number of examples process `index` of `count` reads from `split`."""
    return self.num_examples(self._shard(split, index, count))

  def _shard(self, split, index, count):
    # TFDS resolves even splits against the real split sizes, so shards are
    # disjoint, cover the split, and each process opens only its files.
    return split if count == 1 else tfds.even_splits(split, n=count)[index]

  def read(self, split, index, count):
    """This process's shard of `split`, in file order, not decoded."""
    ds = self.builder.as_dataset(
        split=self._shard(split, index, count),
        shuffle_files=False,
        decoders=self._decoders,
        # Caching is the pipeline's decision (config.cache), not TFDS's.
        read_config=tfds.ReadConfig(try_autocache=False))
    return ds.map(lambda ex: {'image': ex[self.image_key],
                              'label': tf.cast(ex[self.label_key], tf.int64)})


@functools.lru_cache(maxsize=None)
def find_bad_images(root, split):
  """Sorted paths of the files of `root/split/*/` that TensorFlow cannot
  decode: found up front, because tf.data failing mid-training cannot say
  which file it was."""
  builder = tfds.ImageFolder(root)
  ds = builder.as_dataset(
      split=split, decoders={'image': tfds.decode.SkipDecoding()})

  def decoded_name(ex):
    image = tf.io.decode_image(ex['image'], channels=3,
                               expand_animations=False)
    # Returning the shape makes the decode part of the result, so it runs.
    return ex['image/filename'], tf.shape(image)

  names = ds.map(lambda ex: ex['image/filename'])
  good = ds.map(decoded_name, num_parallel_calls=tf.data.AUTOTUNE)
  good = good.ignore_errors()  # Failed decodes drop out; what is left is ok.
  every = {n.decode() for n in names.as_numpy_iterator()}
  ok = {n.decode() for n, _ in good.as_numpy_iterator()}
  return tuple(sorted(every - ok))


class FolderSource:
  """Images in `root/split_name/class_name/*.jpg|jpeg|png` (tfds.ImageFolder).

  Class names are the sorted folder names found over all splits. Split
  strings may slice a split folder ('train[:90%]', 'train[90%:]'). ImageFolder
  has no sub-split reading, so a process steps over the files before its own
  range (reading, not decoding, them): fine at fine-tuning scale.
  """

  def __init__(self, root, bad_images='error'):
    if not root or not tf.io.gfile.isdir(root):
      raise DatasetUnavailableError(
          f'Image folder {root!r} does not exist (config.folder). Expected '
          'root/split_name/class_name/*.jpg|png, e.g. root/train/cat/1.jpg.')
    problems = check_folder_layout(root)
    if problems:
      raise FolderLayoutError(
          f'Image folder {root} (config.folder) is not laid out as '
          f'{_LAYOUT}:{_listed(problems)}')
    self.builder = tfds.ImageFolder(root)
    self.name = f'folder:{root}'
    self.root = root
    self.image_size = None  # Files of any size.
    self._split_sizes = {s: int(i.num_examples)
                         for s, i in self.builder.info.splits.items()}
    if not any(self._split_sizes.values()):
      raise DatasetUnavailableError(
          f'No images found under {root}: expected {_LAYOUT}.')
    self.num_classes = self.builder.info.features['label'].num_classes
    self.class_names = self.builder.info.features['label'].names
    self._bad_images = bad_images
    self._bad = {}  # split folder -> corrupt file names, found on first use.

  def bad_files(self, split_name):
    """Corrupt files of a split folder; raises with bad_images='error'."""
    if split_name not in self._bad:
      bad = find_bad_images(self.root, split_name)
      if bad and self._bad_images == 'error':
        raise BadImagesError(
            f'{len(bad)} image file(s) in {self.root}/{split_name} cannot be '
            f'decoded:{_listed(list(bad))}\nRemove or replace them, or set '
            "config.bad_images='skip' to leave them out.")
      if bad:
        logging.warning('Skipping %d undecodable image(s) in %s/%s, e.g. %s',
                        len(bad), self.root, split_name, bad[0])
      self._bad[split_name] = bad
    return self._bad[split_name]

  def _instructions(self, split):
    """Absolute (split_name, start, end) ranges of a split string."""
    sizes = dict(self._split_sizes)
    try:
      names = [name for name, _, _ in _absolute_ranges(split, sizes)]
    except _UnknownSplit as e:
      raise ValueError(
          f'Split {split!r} is not in {self.root}; its split folders are '
          f'{sorted(self._split_sizes)}.') from e
    # Sizes without corrupt files (bad_files raises if they are an error).
    for name in set(names):
      sizes[name] = self._split_sizes[name] - len(self.bad_files(name))
    return _absolute_ranges(split, sizes)

  def split_sizes(self):
    return dict(self._split_sizes)

  def num_examples(self, split):
    """Usable images in a split string, corrupt files left out."""
    return sum(end - start for _, start, end in self._instructions(split))

  def skipped(self, split):
    """How many corrupt files the split's folders had (and were dropped)."""
    names = {name for name, _, _ in self._instructions(split)}
    return sum(len(self._bad.get(name, ())) for name in names)

  def shard_size(self, split, index, count):
    start, end = shard_range(self.num_examples(split), index, count)
    return end - start

  def read(self, split, index, count):
    """This process's shard of `split`, in ImageFolder's order, not decoded."""
    ds = None
    for name, start, end in self._instructions(split):
      part = self.builder.as_dataset(
          split=name, decoders={'image': tfds.decode.SkipDecoding()})
      bad = self.bad_files(name)
      if bad:
        bad = tf.constant(bad)
        part = part.filter(lambda ex, bad=bad: tf.logical_not(
            tf.reduce_any(tf.equal(ex['image/filename'], bad))))
      part = part.skip(start).take(end - start)
      ds = part if ds is None else ds.concatenate(part)
    start, end = shard_range(self.num_examples(split), index, count)
    ds = ds.skip(start).take(end - start)
    return ds.map(lambda ex: {'image': ex['image'], 'label': ex['label']})


def get_source(config):
  """The source named by config.dataset ('folder', 'digits' or TFDS name)."""
  if config.dataset == 'folder':
    return FolderSource(config.folder, config.bad_images)
  return TfdsSource(config.dataset, config.data_dir)


def class_names(config) -> Optional[List[str]]:
  """Class names of the run's data set, when its label has them."""
  names = get_source(config).class_names
  return [str(n) for n in names] if names else None
