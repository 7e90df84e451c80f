"""Classify image files with a pretrained or exported Mixer.

  python -m mixer_jax.predict --checkpoint=imagenet1k/Mixer-B_16 cat.jpg dog.png

  python -m mixer_jax.predict --checkpoint=workdirs/quickstart --output=csv digits
  python -m mixer_jax.predict \
      --checkpoint=hf-hub:timm/mixer_b16_224.goog_in21k_ft_in1k cat.jpg

`--checkpoint` is any checkpoint `mixer_jax.weights.any_checkpoint.load` accepts: a
training workdir (newest step, or `--step=K`), an official-format `.npz`, a
registry name (see `mixer_jax.weights.registry`), a Hub name (`hf-hub:OWNER/NAME
[@REVISION]`) or a timm-format `.safetensors`. Prints the top-5 classes per
image, with the class names the checkpoint brings (a workdir's data set, a
Hub config's label names), ImageNet names for ImageNet-1k heads, and class
indices otherwise. Images of any size are preprocessed as the checkpoint's
evaluation (`preprocess.eval_image`: a workdir's config.pp.eval_crop, the
ImageNet resize-and-crop otherwise).

Inputs are image files, directories (their images, sorted, subdirectories
included), quoted glob patterns ('photos/*.jpg', expanded here) or `-` (one
image read from stdin), classified `--batch_size` at a time.
`--output=json` prints one JSON object per line and image, `--output=csv`
a header and one row per image (path, then class, name and probability of
each of the top-k), both on stdout. A file that cannot be read or decoded,
or has more than `--max_megapixels` (checked from its header, before
decoding), is reported and skipped; the exit status is 1 if any failed.
"""

import csv
import dataclasses
import importlib.resources
import io
import json
import math
import os
import re
import sys
from typing import Iterator, List, Optional, Sequence, Tuple

from absl import app
from absl import flags
from absl import logging
import numpy as np
from PIL import Image

# Before TensorFlow loads: it quiets TensorFlow's C++ start-up lines.
from mixer_jax.errors import UserError
from mixer_jax.training import command_line
from mixer_jax.training import errors

IMAGENET_CLASSES_FILE = 'imagenet2012_classes.txt'
# What TensorFlow's decoder reads (`preprocess.decode`): a directory's
# other files are not images.
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.gif', '.bmp')
STDIN = '-'
# A decoded 100-megapixel image takes 300 MB, and its float copies more.
MAX_MEGAPIXELS = 100


@dataclasses.dataclass
class Prediction:
  """Result for one file: `top` is [(class index, softmax score)], best first,
  or `error` says why the file could not be classified."""
  path: str
  top: List[Tuple[int, float]]
  error: Optional[str] = None


class ImageTooLargeError(ValueError):
  """An image with more pixels than the limit, found before decoding."""


def imagenet_class_names() -> List[str]:
  """The 1,000 ImageNet-1k class names in the standard label order."""
  text = importlib.resources.files('mixer_jax').joinpath(
      'data', IMAGENET_CLASSES_FILE).read_text(encoding='utf-8')
  names = text.splitlines()
  if len(names) != 1000:
    raise RuntimeError(f'{IMAGENET_CLASSES_FILE} has {len(names)} lines, '
                       f'expected 1000; the installation is damaged.')
  return names


_WORDNET_ID = re.compile(r'n\d{8}')


def readable_class_names(
    names: Optional[Sequence[str]]) -> Optional[Sequence[str]]:
  """ImageNet-1k's readable names in place of its WordNet ids, else `names`.

  TFDS names imagenet2012's labels by WordNet id ('n01440764'), sorted, which
  is the standard label order of the readable names this package ships
  ('tench'); a workdir trained on imagenet2012 brings those ids. Any other
  list (ImageNet-21k's 21,843 ids, a data set's own names) is kept as it is.
  """
  if (names is None or len(names) != 1000 or
      not all(_WORDNET_ID.fullmatch(n) for n in names) or
      list(names) != sorted(names)):
    return names
  return imagenet_class_names()


def class_names(spec: str, num_classes: int, entry) -> Optional[List[str]]:
  """Names for the head's classes, or None to print indices.

  Args:
    spec: 'auto' (ImageNet-1k names for registry ImageNet-1k checkpoints and
      for files with a 1000-class head), 'imagenet2012', 'none', or a path
      to a text file with one name per line.
    num_classes: head size of the model.
    entry: the checkpoint's `registry.Checkpoint`, if it is a registered one.
  """
  if spec == 'none':
    return None
  if spec == 'auto':
    is_1k = (entry.dataset == 'imagenet2012' if entry is not None
             else num_classes == 1000)
    return imagenet_class_names() if is_1k else None
  if spec == 'imagenet2012':
    names = imagenet_class_names()
  else:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    if not tf.io.gfile.exists(spec) or tf.io.gfile.isdir(spec):
      raise errors.UsageError(f'--labels={spec}: no such file (give a text '
                              "file with one class name per line, 'auto', "
                              "'imagenet2012' or 'none').")
    with tf.io.gfile.GFile(spec, 'r') as f:
      names = f.read().splitlines()
  if len(names) != num_classes:
    raise errors.UsageError(f'--labels={spec} has {len(names)} names but the model '
                     f'has {num_classes} classes.')
  return names


def expand_inputs(args: Sequence[str]) -> List[str]:
  """The image paths of the command line's files, directories and globs.

  A directory gives its files with an image suffix, subdirectories
  included, sorted; a pattern with `*`, `?` or `[` the files it matches,
  sorted (a file of that very name if none).

  Raises:
    UsageError: a directory without images, a pattern matching nothing, or
      `-` with a terminal as stdin.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if STDIN in args and sys.stdin.isatty():
    raise errors.UsageError("'-' reads one image from stdin, which is a "
                            'terminal here: pipe the image in '
                            '(predict ... - < image.png).')
  paths = []
  for arg in args:
    if arg != STDIN and tf.io.gfile.isdir(arg):
      found = sorted(
          os.path.join(root, name) for root, _, names in tf.io.gfile.walk(arg)
          for name in names if name.lower().endswith(IMAGE_SUFFIXES))
      if not found:
        raise errors.UsageError(f'{arg} is a directory without images '
                                f'({", ".join(IMAGE_SUFFIXES)}).')
    elif any(c in arg for c in '*?[') and not tf.io.gfile.exists(arg):
      found = sorted(tf.io.gfile.glob(arg))
      if not found:
        raise errors.UsageError(f'No file matches {arg}.')
    else:
      found = [arg]
    paths += found
  return paths


def _read_image(path: str, max_megapixels: float) -> bytes:
  """The bytes of an image file (`-`: stdin), its size checked first.

  Raises:
    ImageTooLargeError: the header gives more than `max_megapixels`.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if path == STDIN:
    data = sys.stdin.buffer.read()
  else:
    with tf.io.gfile.GFile(path, 'rb') as f:
      data = f.read()
  # PIL reads the size from the header without decoding; its own guard
  # against huge images is replaced by the limit here.
  limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
  try:
    width, height = Image.open(io.BytesIO(data)).size
  except (OSError, SyntaxError, ValueError):
    return data  # Not an image PIL knows: TensorFlow's decoder says why.
  finally:
    Image.MAX_IMAGE_PIXELS = limit
  if width * height > max_megapixels * 1e6:
    raise ImageTooLargeError(
        f'{width}x{height} is {width * height / 1e6:.3g} megapixels, above '
        f'the limit of {max_megapixels:g}; raise it with '
        f'--max_megapixels={math.ceil(width * height / 1e6)}')
  return data


def classify_files(model, params, paths: Sequence[str], *, image_size: int,
                   crop: str = 'resize_crop', resize_size: int = 0,
                   top_k: int = 5, batch_size: int = 32,
                   max_megapixels: float = MAX_MEGAPIXELS
                   ) -> Iterator[Prediction]:
  """Classifies each file; unreadable or undecodable files get an `error`.

  Args:
    model: a Mixer with a head (`num_classes` > 0).
    params: its parameters.
    paths: image files (JPEG, PNG, GIF, BMP; local or `gs://`; `-` for
      stdin).
    image_size: model input side.
    crop: 'resize_crop' (short side to `resize_size`, central crop: the
      ImageNet evaluation) or 'resize' (plain resize: the fine-tuning eval).
    resize_size: short side before cropping; 0 means image_size * 256/224.
    top_k: classes reported per image.
    batch_size: images run through the model at once.
    max_megapixels: larger images are refused before they are decoded.

  Yields:
    A `Prediction` per path, in order, a batch at a time.
  """
  # pylint: disable=g-import-not-at-top
  import tensorflow as tf
  from mixer_jax.data import preprocess
  from mixer_jax.data import preprocess_choices
  from mixer_jax.training import compiled

  if not model.num_classes:
    raise ValueError('The model has no head; load it with a class count.')
  resize_size = resize_size or preprocess_choices.imagenet_eval_resize(
      image_size)
  scores_fn = compiled.predict_function(model)
  k = min(top_k, model.num_classes)
  # Every batch padded to one size: the model is compiled once.
  size = min(batch_size, len(paths))
  for start in range(0, len(paths), size):
    results, images = [], []
    for path in paths[start:start + size]:
      try:
        data = _read_image(path, max_megapixels)
        if preprocess.png_has_alpha(data):  # As in training: read as RGB.
          logging.warning('%s has an alpha channel; it is ignored (the image '
                          'is read as RGB, as in training).', path)
        images.append(preprocess.eval_image(
            tf.constant(data), image_size, crop=crop,
            resize_size=resize_size).numpy())
        results.append(Prediction(path, []))
      except (tf.errors.OpError, OSError, ValueError) as e:
        results.append(Prediction(path, [], _describe_error(e)))
    if images:
      batch = np.zeros((size,) + images[0].shape, images[0].dtype)
      batch[:len(images)] = images
      scores = iter(np.asarray(scores_fn(params, batch)))
      for result in results:
        if not result.error:
          row = next(scores)
          best = np.argsort(-row, kind='stable')[:k]
          result.top = [(int(i), float(row[i])) for i in best]
    yield from results


def _describe_error(error: Exception) -> str:
  """A one-line reason without TensorFlow's op and device decorations."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  message = getattr(error, 'message', None) or str(error) or repr(error)
  message = re.sub(r'\{\{[^}]*\}\}\s*', '', message.strip().splitlines()[0])
  message = re.sub(r'\s*\[Op:[^\]]*\].*$', '', message)
  unreadable = isinstance(error, (tf.errors.NotFoundError,
                                  tf.errors.PermissionDeniedError, OSError))
  if isinstance(error, ImageTooLargeError):
    return f'image refused: {message}'
  return f'cannot {"read" if unreadable else "decode"} image: {message}'


def format_prediction(prediction: Prediction,
                      names: Optional[Sequence[str]]) -> str:
  """Human-readable lines for one file (ImageNet names, not WordNet ids)."""
  if prediction.error:
    return f'{prediction.path}: ERROR {prediction.error}'
  names = readable_class_names(names)
  lines = [f'{prediction.path}:']
  for rank, (index, score) in enumerate(prediction.top, 1):
    label = f'{index:5d} {names[index]}' if names else f'{index:5d}'
    lines.append(f'  {rank}. {score:7.4f} {label}')
  return '\n'.join(lines)


def prediction_record(prediction: Prediction,
                      names: Optional[Sequence[str]]) -> dict:
  """One file's result as a JSON-ready dict (`--output=json`)."""
  if prediction.error:
    return {'path': prediction.path, 'error': prediction.error}
  names = readable_class_names(names)
  return {'path': prediction.path, 'top': [
      {'class': index, 'name': names[index] if names else None,
       'probability': score} for index, score in prediction.top]}


def csv_row(record: dict, top_k: int) -> List:
  """A `prediction_record` as a row of `--output=csv`: path, then class,
  name and probability of each rank, then the error."""
  top = record.get('top', []) + [{}] * top_k
  return [record['path']] + [
      cell for entry in top[:top_k] for cell in (
          entry.get('class', ''), entry.get('name') or '',
          entry.get('probability', ''))] + [record.get('error', '')]


FLAGS = flags.FLAGS


def _define_flags():
  """Defines the command-line flags (only when run as a program)."""
  flags.DEFINE_string(
      'checkpoint', None, 'Training workdir, registry name (e.g. '
      'imagenet1k/Mixer-B_16), hf-hub:OWNER/NAME[@REVISION], official .npz '
      'or timm .safetensors.', required=True)
  flags.DEFINE_enum('weights', 'params', ['params', 'ema'],
                    "A workdir's trained weights, or their EMA (runs with "
                    'config.ema_decay > 0).')
  flags.DEFINE_integer('step', None, 'Orbax step of a workdir (default: the '
                       'newest).')
  flags.DEFINE_integer(
      'image_size', 0, 'Input side; 0 uses the checkpoint\'s own resolution.')
  flags.DEFINE_enum(
      'crop', None, ['resize_crop', 'resize'],
      'resize_crop: short side to --resize_size, central crop (ImageNet '
      'eval); resize: plain resize (fine-tuning eval). Default: the '
      'checkpoint\'s own eval preprocessing.')
  flags.DEFINE_integer(
      'resize_size', 0, 'Short side before the central crop; 0 uses the '
      'checkpoint\'s (image_size * 256 / 224 for ImageNet weights).')
  flags.DEFINE_integer('top_k', 5, 'Classes printed per image.',
                       lower_bound=1)
  flags.DEFINE_integer('batch_size', 32, 'Images run through the model at '
                       'once.', lower_bound=1)
  flags.DEFINE_enum('output', 'text', ['text', 'json', 'csv'],
                    'text: readable lines; json: one JSON object per line '
                    'and image; csv: a header and one row per image.')
  flags.DEFINE_float('max_megapixels', MAX_MEGAPIXELS, 'Larger images are '
                     'refused (read from the header, before decoding).',
                     lower_bound=0)
  flags.DEFINE_string(
      'labels', 'auto', "'auto', 'imagenet2012', 'none' (indices) or a text "
      'file with one class name per line.')
  command_line.define_verbose_flag()


def main(argv):
  command_line.set_up_output(FLAGS.verbose)
  with command_line.user_errors_as_one_line():
    if len(argv) < 2:
      raise errors.UsageError(
          'Give one or more image files, directories or quoted glob patterns '
          "after the flags ('-': one image from stdin).")
    command_line.load_tensorflow_quietly()  # It decodes images, as in training.
    paths = expand_inputs(argv[1:])
  from mixer_jax.weights import any_checkpoint  # pylint: disable=g-import-not-at-top
  try:
    loaded = any_checkpoint.load(FLAGS.checkpoint, step=FLAGS.step,
                                 image_size=FLAGS.image_size or None,
                                 weights=FLAGS.weights)
    model, params = loaded.model, loaded.params
    if not model.num_classes:
      raise errors.UsageError(
          f'{FLAGS.checkpoint} has no classification head.')
    if FLAGS.labels == 'auto' and loaded.class_names:
      names = loaded.class_names
    else:
      names = class_names(FLAGS.labels, model.num_classes, loaded.entry)
  except UserError as e:
    # Only the project's user errors: anything else is a bug (traceback).
    print(f'Cannot use --checkpoint={FLAGS.checkpoint}: '
          f'{command_line.one_line(e)}', file=sys.stderr)
    return 2
  results = classify_files(
      model, params, paths, image_size=loaded.image_size,
      crop=FLAGS.crop or loaded.eval_crop,
      resize_size=FLAGS.resize_size or loaded.eval_resize, top_k=FLAGS.top_k,
      batch_size=FLAGS.batch_size, max_megapixels=FLAGS.max_megapixels)
  top_k = min(FLAGS.top_k, model.num_classes)
  writer = csv.writer(sys.stdout)
  if FLAGS.output == 'csv':
    writer.writerow(['path'] + [f'{field}_{rank}' for rank in range(
        1, top_k + 1) for field in ('class', 'name', 'probability')] +
                    ['error'])
  failed = []
  for result in results:
    if FLAGS.output == 'text':
      print(format_prediction(result, names))
    elif FLAGS.output == 'json':
      print(json.dumps(prediction_record(result, names)))
    else:
      writer.writerow(csv_row(prediction_record(result, names), top_k))
    sys.stdout.flush()
    if result.error:
      failed.append(result.path)
  if failed:
    print(f'{len(failed)} of {len(paths)} files failed: {", ".join(failed)}',
          file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  _define_flags()
  app.run(main)
