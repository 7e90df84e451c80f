"""Image preprocessing ops for the tf.data pipelines (TensorFlow, CPU).

Random ops are stateless (`seed`: an int tensor of shape (2,)), so an example
gets the same augmentation on every run, after a resume and in any number of
parallel map calls. The Inception crop decodes encoded JPEGs only inside
its window, as big_vision's op does (JPEG decoding dominates the pipeline's
CPU time); vit_jax's fine-tuning crop decodes the whole image, as vit_jax.
Outputs are float32 in [-1, 1]; the ops of big_vision's recipe return uint8
after resizing, as its `pp` ops do (docs/recipes.md).
"""

import tensorflow as tf

from mixer_jax.data.preprocess_choices import EVAL_CROPS
from mixer_jax.data.preprocess_choices import RESIZE_METHODS

# Aspect ratios of random crops: big_vision's Inception crop (ratio_min,
# ratio_max) and TF's default that vit_jax's crop uses.
_ASPECT_RATIO_RANGE = (0.75, 1.33)


def normalize(image):
  """Maps pixel values 0..255 (any dtype) to float32 [-1, 1]."""
  return (tf.cast(image, tf.float32) - 127.5) / 127.5


def to_uint8(image):
  """Resized float pixels back to uint8 as big_vision's resize ops return
  them: clipped to [0, 255], then truncated (not rounded)."""
  if image.dtype == tf.uint8:
    return image
  return tf.cast(tf.clip_by_value(image, 0.0, 255.0), tf.uint8)


def _rgb(image):
  """A uint8 image with exactly 3 channels (grey is repeated)."""
  image = tf.convert_to_tensor(image)
  if image.shape.rank != 3:
    raise ValueError(f'Expected an HxWxC image, got shape {image.shape}.')
  if image.shape[-1] == 1:
    image = tf.image.grayscale_to_rgb(image)
  elif image.shape[-1] != 3:
    raise ValueError(
        f'Expected 1 or 3 image channels, got {image.shape[-1]}; convert '
        'RGBA or other layouts to RGB before training.')
  return tf.cast(image, tf.uint8)


def png_has_alpha(encoded: bytes) -> bool:
  """Whether `encoded` is a PNG with an alpha channel, which `decode` drops:
  read from its header (byte 25, the IHDR colour type: 4 grey + alpha, 6
  RGB + alpha), without decoding the image."""
  return (encoded[:8] == b'\x89PNG\r\n\x1a\n' and len(encoded) > 25 and
          encoded[25] in (4, 6))


def decode(image):
  """uint8 (H, W, 3) from JPEG, PNG, GIF or BMP bytes, or an HxWxC image
  with C in {1, 3}."""
  image = tf.convert_to_tensor(image)
  if image.dtype == tf.string:
    image = tf.io.decode_image(image, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image
  return _rgb(image)


def decode_and_crop(image, crop_window):
  """Decodes `image` and crops it to `crop_window` = [y, x, height, width].

  Encoded JPEGs are decoded only inside the window.
  """
  image = tf.convert_to_tensor(image)
  y, x, h, w = tf.unstack(crop_window)
  if image.dtype != tf.string:
    return _rgb(image)[y:y + h, x:x + w]

  def jpeg():
    return tf.image.decode_and_crop_jpeg(image, crop_window, channels=3)

  def other():
    return decode(image)[y:y + h, x:x + w]

  cropped = tf.cond(tf.io.is_jpeg(image), jpeg, other)
  cropped.set_shape([None, None, 3])
  return cropped


def random_crop_window(image_shape, seed, area_min=0.05):
  """int32 [y, x, height, width], drawn as vit_jax's fine-tuning crop and
  big_vision's `inception_crop` do: area uniform in [area_min, 1] of the
  image, aspect ratio in [0.75, 1.33], whole image after 100 failed tries.
  """
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.cast(image_shape, tf.int32),
      bounding_boxes=tf.zeros([1, 0, 4], tf.float32),
      seed=seed,
      min_object_covered=0.0,
      aspect_ratio_range=_ASPECT_RATIO_RANGE,
      area_range=(area_min, 1.0),
      max_attempts=100,
      use_image_if_no_bounding_boxes=True)
  return tf.stack([begin[0], begin[1], size[0], size[1]])


def decode_and_random_crop(image, seed, area_min=0.05):
  """uint8 (h, w, 3): a `random_crop_window` of an encoded or decoded
  image; JPEGs are decoded only inside it, their size read from the header.
  """
  image = tf.convert_to_tensor(image)

  def crop(decoded):
    return decode_and_crop(
        decoded, random_crop_window(tf.shape(decoded), seed, area_min))

  if image.dtype != tf.string:
    return crop(_rgb(image))

  def jpeg():
    return tf.image.decode_and_crop_jpeg(image, random_crop_window(
        tf.image.extract_jpeg_shape(image), seed, area_min), channels=3)
  cropped = tf.cond(tf.io.is_jpeg(image), jpeg, lambda: crop(decode(image)))
  cropped.set_shape([None, None, 3])
  return cropped


def resize(image, image_size):
  """Resizes (bilinear, no antialiasing, as official) to a float32 square.

  `image` is one HxWx3 image or a batch of them (NxHxWx3).
  """
  image = tf.image.resize(image, [image_size, image_size], method='bilinear')
  image.set_shape(image.shape[:-3].concatenate([image_size, image_size, 3]))
  return image


def resize_small(image, size, method='area'):
  """Resizes so that the shorter side is `size`, keeping the aspect ratio.

  `method` is a tf.image.resize method; 'area' (big_vision's default for
  `resize_small`) averages the source pixels each output pixel covers. The
  result is uint8 (`to_uint8`), as big_vision's `resize_small`.
  """
  if method not in RESIZE_METHODS:
    raise ValueError(f'Unknown resize method {method!r}: use one of '
                     f'{RESIZE_METHODS} (config.pp.eval_resize_method).')
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = tf.cast(size, tf.float32) / tf.reduce_min(shape)
  new = tf.cast(tf.round(shape * scale), tf.int32)
  new = tf.maximum(new, size)  # Guards the short side against rounding.
  return to_uint8(tf.image.resize(tf.cast(image, tf.float32), new,
                                  method=method))


def central_crop(image, size):
  """Crops the central size x size square of an image at least that big."""
  shape = tf.shape(image)
  y, x = (shape[0] - size) // 2, (shape[1] - size) // 2
  image = image[y:y + size, x:x + size]
  image.set_shape([size, size, 3])
  return image


def train_image(image, seed, *, image_size, crop='inception',
                area_min=0.05, flip=True, randaugment=None):
  """Training augmentation of one image (`crop`: one of TRAIN_CROPS,
  checked with the config); RandAugment's TF-TPU ops take uint8 images."""
  image = tf.convert_to_tensor(image)
  seeds = tf.random.experimental.stateless_split(seed, 3)
  if crop != 'inception':
    # vit_jax decodes the whole image, then crops: libjpeg decoding inside
    # the window (big_vision's op) upsamples chroma differently on its
    # right edge.
    image = decode(image)
  if crop != 'resize':  # The two crops differ in the area bound only.
    image = decode_and_random_crop(image, seeds[0], area_min)
  image = resize(image, image_size)
  if crop == 'inception':  # big_vision's decode_jpeg_and_inception_crop.
    image = to_uint8(image)
  if flip:
    image = tf.image.stateless_random_flip_left_right(image, seeds[1])
  if randaugment is not None:
    image = randaugment(to_uint8(image), seeds[2])
  return normalize(image)


def eval_image(image, image_size, crop='resize', resize_size=256,
               resize_method='area'):
  """Deterministic evaluation preprocessing of one image.

  `crop`: 'resize' the whole image to image_size (vit_jax's fine-tuning
  eval, float); 'resize_crop' the short side to resize_size, then the
  central crop (big_vision's `resize_small(256)|central_crop(224)`);
  'squash_crop' the whole image to resize_size square, then the central crop
  (big_vision's few-shot `resize(256)|central_crop(224)`).
  """
  image = decode(image)
  if crop not in EVAL_CROPS:
    raise ValueError(
        f'Unknown eval crop {crop!r}: use one of {EVAL_CROPS} '
        '(config.pp.eval_crop).')
  if crop != 'resize' and resize_size < image_size:
    raise ValueError(
        f'eval resize size {resize_size} is smaller than the crop '
        f'{image_size}; set config.pp.eval_resize >= config.image_size.')
  if crop == 'resize':
    image = resize(image, image_size)
  elif crop == 'resize_crop':
    image = central_crop(resize_small(image, resize_size, resize_method),
                         image_size)
  else:
    image = central_crop(to_uint8(resize(image, resize_size)), image_size)
  return normalize(image)
