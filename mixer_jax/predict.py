"""Classify image files with a pretrained or exported Mixer.

  python -m mixer_jax.predict --checkpoint=imagenet1k/Mixer-B_16 cat.jpg dog.png

  python -m mixer_jax.predict --checkpoint=workdirs/quickstart --output=csv digits
  python -m mixer_jax.predict \
      --checkpoint=hf-hub:timm/mixer_b16_224.goog_in21k_ft_in1k cat.jpg

A file that cannot be read or decoded is reported and skipped (exit 1).
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
from mixer_jax.training import command_line
from mixer_jax.training import errors

# What TensorFlow's decoder reads: a directory's other files are skipped.
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.gif', '.bmp')
STDIN = '-'
# A decoded 100-megapixel image takes 300 MB, and its float copies more.
MAX_MEGAPIXELS = 100
_WORDNET_ID = re.compile(r'n\d{8}')


@dataclasses.dataclass
class Prediction:
  """`top`: [(class index, score)], best first; or why it failed."""
  path: str
  top: List[Tuple[int, float]]
  error: Optional[str] = None


def imagenet_class_names() -> List[str]:
  return importlib.resources.files('mixer_jax').joinpath(
      'data', 'imagenet2012_classes.txt').read_text('utf-8').splitlines()


def readable_class_names(
    names: Optional[Sequence[str]]) -> Optional[Sequence[str]]:
  """ImageNet-1k's names ('tench') for TFDS's sorted WordNet ids
  ('n01440764'), the same order; any other list is kept."""
  if (names is None or len(names) != 1000 or
      not all(_WORDNET_ID.fullmatch(n) for n in names) or
      list(names) != sorted(names)):
    return names
  return imagenet_class_names()


def class_names(spec: str, num_classes: int, entry) -> Optional[List[str]]:
  """The head's class names for `--labels=spec`, or None for indices."""
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
    raise errors.UsageError(f'--labels={spec} has {len(names)} names but the '
                            f'model has {num_classes} classes.')
  return names


def expand_inputs(args: Sequence[str]) -> List[str]:
  """The image paths of the command line's files, directories (searched
  down) and globs (a file of that very name first), sorted."""
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
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if path == STDIN:
    data = sys.stdin.buffer.read()
  else:
    with tf.io.gfile.GFile(path, 'rb') as f:
      data = f.read()
  # PIL reads the size from the header without decoding; the flag replaces
  # its own guard.
  limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
  try:
    width, height = Image.open(io.BytesIO(data)).size
  except (OSError, SyntaxError, ValueError):
    return data  # Not an image PIL knows: TensorFlow's decoder says why.
  finally:
    Image.MAX_IMAGE_PIXELS = limit
  megapixels = width * height / 1e6
  if megapixels > max_megapixels:
    raise Image.DecompressionBombError(
        f'{width}x{height} is {megapixels:.3g} megapixels, above the limit '
        f'of {max_megapixels:g}; raise it with '
        f'--max_megapixels={math.ceil(megapixels)}')
  return data


def _describe_error(error: Exception) -> str:
  """A one-line reason without TensorFlow's op and device decorations."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  message = getattr(error, 'message', None) or str(error) or repr(error)
  message = re.sub(r'\{\{[^}]*\}\}\s*', '', message.strip().splitlines()[0])
  message = re.sub(r'\s*\[Op:[^\]]*\].*$', '', message)
  if isinstance(error, Image.DecompressionBombError):
    return f'image refused: {message}'
  if isinstance(error, (tf.errors.NotFoundError,
                        tf.errors.PermissionDeniedError, OSError)):
    return f'cannot read image: {message}'
  return f'cannot decode image: {message}'


def classify_files(model, params, paths: Sequence[str], *, image_size: int,
                   crop: str = 'resize_crop', resize_size: int = 0,
                   top_k: int = 5, batch_size: int = 32,
                   max_megapixels: float = MAX_MEGAPIXELS
                   ) -> Iterator[Prediction]:
  """A `Prediction` per path, in order (`preprocess.eval_image`'s crop)."""
  # pylint: disable=g-import-not-at-top
  import tensorflow as tf
  from mixer_jax.data import preprocess
  from mixer_jax.data import preprocess_choices
  from mixer_jax.training import compiled

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
      except (tf.errors.OpError, OSError, ValueError,
              Image.DecompressionBombError) as e:
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


def prediction_record(prediction: Prediction,
                      names: Optional[Sequence[str]]) -> dict:
  """What every `--output` format prints of one file."""
  if prediction.error:
    return {'path': prediction.path, 'error': prediction.error}
  names = readable_class_names(names)
  return {'path': prediction.path, 'top': [
      {'class': index, 'name': names[index] if names else None,
       'probability': score} for index, score in prediction.top]}


def format_prediction(prediction: Prediction,
                      names: Optional[Sequence[str]]) -> str:
  record = prediction_record(prediction, names)
  if 'error' in record:
    return f'{prediction.path}: ERROR {prediction.error}'
  return '\n'.join([f'{prediction.path}:'] + [
      f'  {rank}. {t["probability"]:7.4f} {t["class"]:5d}' +
      (f' {t["name"]}' if t['name'] is not None else '')
      for rank, t in enumerate(record['top'], 1)])


def csv_row(record: dict) -> dict:
  row = {'path': record['path'], 'error': record.get('error', '')}
  for rank, entry in enumerate(record.get('top', []), 1):
    row.update({f'{key}_{rank}': '' if value is None else value
                for key, value in entry.items()})
  return row


FLAGS = flags.FLAGS


def _define_flags():
  command_line.define_checkpoint_flags()
  flags.DEFINE_integer('image_size', 0, "Input side; 0: the checkpoint's.")
  flags.DEFINE_enum('crop', None, ['resize_crop', 'resize'],
                    "Eval crop (preprocess.eval_image); default: the "
                    "checkpoint's.")
  flags.DEFINE_integer('resize_size', 0, 'Short side before the central '
                       "crop; 0: the checkpoint's.")
  flags.DEFINE_integer('top_k', 5, 'Classes printed per image.',
                       lower_bound=1)
  flags.DEFINE_integer('batch_size', 32, 'Images run through the model at '
                       'once.', lower_bound=1)
  flags.DEFINE_enum('output', 'text', ['text', 'json', 'csv'],
                    'Readable lines, a JSON object per image, or CSV rows.')
  flags.DEFINE_float('max_megapixels', MAX_MEGAPIXELS, 'Larger images are '
                     'refused, before decoding.', lower_bound=0)
  flags.DEFINE_string('labels', 'auto', "'auto', 'imagenet2012', 'none' "
                      '(indices) or a file of class names, one a line.')
  command_line.define_verbose_flag()


def main(argv):
  command_line.set_up_output(FLAGS.verbose)
  with command_line.user_errors_as_one_line():
    if len(argv) < 2:
      raise errors.UsageError(
          'Give one or more image files, directories or quoted glob patterns '
          "after the flags ('-': one image from stdin).")
    command_line.load_tensorflow_quietly()  # It decodes images, as training.
    paths = expand_inputs(argv[1:])
  from mixer_jax.weights import any_checkpoint  # pylint: disable=g-import-not-at-top
  with command_line.user_errors_as_one_line(
      f'Cannot use --checkpoint={FLAGS.checkpoint}: '):
    loaded = any_checkpoint.load(FLAGS.checkpoint, step=FLAGS.step,
                                 image_size=FLAGS.image_size or None,
                                 weights=FLAGS.weights)
    if not loaded.num_classes:
      raise errors.UsageError(
          f'{FLAGS.checkpoint} has no classification head.')
    if FLAGS.labels == 'auto' and loaded.class_names:
      names = loaded.class_names
    else:
      names = class_names(FLAGS.labels, loaded.num_classes, loaded.entry)
  results = classify_files(
      loaded.model, loaded.params, paths, image_size=loaded.image_size,
      crop=FLAGS.crop or loaded.eval_crop,
      resize_size=FLAGS.resize_size or loaded.eval_resize, top_k=FLAGS.top_k,
      batch_size=FLAGS.batch_size, max_megapixels=FLAGS.max_megapixels)
  if FLAGS.output == 'csv':
    ranks = range(1, min(FLAGS.top_k, loaded.num_classes) + 1)
    writer = csv.DictWriter(sys.stdout, ['path'] + [
        f'{key}_{rank}' for rank in ranks
        for key in ('class', 'name', 'probability')] + ['error'], restval='')
    writer.writeheader()
  failed = []
  for result in results:
    if FLAGS.output == 'text':
      print(format_prediction(result, names))
    elif FLAGS.output == 'json':
      print(json.dumps(prediction_record(result, names)))
    else:
      writer.writerow(csv_row(prediction_record(result, names)))
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
