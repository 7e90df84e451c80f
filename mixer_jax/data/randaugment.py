"""RandAugment as the TF-TPU reference executes it, as stateless TF ops.

big_vision's `randaug(2, 15)` (the Mixer ImageNet-1k recipe) is the
RandAugment of `tensorflow/tpu`, `models/official/efficientnet/
autoaugment.py` (`distort_image_with_randaugment`), rewritten here for TF2
`tf.data`; what it keeps of the reference (levels past MAX_LEVEL, the signs,
the grey fill, Solarize's uint8 wrap) is listed in docs/recipes.md. Images
are uint8 HxWx3 in and out. Every choice comes from one (2,) seed
(`layer_draws`), so an example gets the same augmentation on every run and in
every parallel map call, and tests can replay it.
"""

import functools
import math

import tensorflow as tf

# The ops whose argument gets a random sign (`_randomly_negate_tensor`).
SIGNED_OPS = ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY')

# Top of the level scale (reference: `_MAX_LEVEL = 10.`).
MAX_LEVEL = 10.0
# Pixels at level MAX_LEVEL (reference: `HParams(translate_const=100,
# cutout_const=40)`).
TRANSLATE_CONST = 100
CUTOUT_CONST = 40
# Grey for emptied pixels (reference: `replace_value = [128] * 3`).
FILL_VALUE = 128
# Sharpness's smoothing kernel, divided by 13 (PIL's ImageFilter.SMOOTH).
_SMOOTH = ((1, 1, 1), (1, 5, 1), (1, 1, 1))


# The reference's level rules (`level_to_arg`): an op's unsigned argument
# at level = magnitude / MAX_LEVEL; the ops missing here take none.
_ARGUMENTS = {
    'Rotate': lambda level: level * 30.0,
    'Posterize': lambda level: int(level * 4),
    'Solarize': lambda level: int(level * 256),
    'SolarizeAdd': lambda level: int(level * 110),
    **dict.fromkeys(('Color', 'Contrast', 'Brightness', 'Sharpness'),
                    lambda level: level * 1.8 + 0.1),
    **dict.fromkeys(('ShearX', 'ShearY'), lambda level: level * 0.3),
    **dict.fromkeys(('TranslateX', 'TranslateY'),
                    lambda level: level * float(TRANSLATE_CONST)),
    'Cutout': lambda level: int(level * CUTOUT_CONST),
}


def op_argument(name, magnitude):
  """The unsigned argument op `name` gets at `magnitude` (None: takes none)."""
  rule = _ARGUMENTS.get(name)
  return rule(float(magnitude) / MAX_LEVEL) if rule else None


# ------------------------------------------------------------- The ops.
# All take and return uint8 (H, W, 3) tensors. They avoid `tf.where` on
# images: TensorFlow's select over a uint8 image, or with a scalar or
# broadcast condition, costs about 1 ms per 224x224 image on one core, 5 to
# 10 times the arithmetic, slicing or bitwise form written here (measured:
# docs/performance.md). Every rewrite computes the same values.


def _blend(image1, image2, factor):
  """The reference's `blend`: image1 + factor * (image2 - image1), clipped,
  truncated (not rounded) to uint8."""
  image1 = tf.cast(image1, tf.float32)
  image2 = tf.cast(image2, tf.float32)
  out = image1 + factor * (image2 - image1)
  return tf.cast(tf.clip_by_value(out, 0.0, 255.0), tf.uint8)


def auto_contrast(image):
  """Stretches each channel to 0..255 (a flat channel is left as is)."""
  def channel(x):
    x = tf.cast(x, tf.float32)
    lo, hi = tf.reduce_min(x), tf.reduce_max(x)
    scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)
    offset = tf.where(hi > lo, -lo * scale, 0.0)
    # x * scale - lo * scale, in the reference's order of float operations.
    return tf.clip_by_value(x * scale + offset, 0.0, 255.0)
  out = tf.stack([channel(image[..., c]) for c in range(3)], axis=-1)
  return tf.cast(out, tf.uint8)


def equalize(image):
  """Histogram equalisation per channel, PIL's ImageOps.equalize rule.

  step = (pixels - count of the brightest present value) // 255; value v
  maps to (step // 2 + pixels below v) // step; a channel with step 0 is
  left unchanged.
  """
  def channel(x):
    x = tf.cast(x, tf.int32)
    hist = tf.math.bincount(tf.reshape(x, [-1]), minlength=256, maxlength=256)
    present = tf.boolean_mask(hist, hist > 0)
    step = (tf.reduce_sum(present) - present[-1]) // 255
    below = tf.cumsum(hist, exclusive=True)
    lut = tf.clip_by_value((below + step // 2) // tf.maximum(step, 1), 0, 255)
    lut = tf.where(step > 0, lut, tf.range(256))
    return tf.gather(lut, x)
  out = tf.stack([channel(image[..., c]) for c in range(3)], axis=-1)
  return tf.cast(out, tf.uint8)


def posterize(image, bits):
  """Keeps the `bits` high bits of every value."""
  # Magnitudes past 20 would ask for more than 8 bits, which the reference
  # leaves undefined (a negative shift); they keep all 8 here.
  shift = max(0, 8 - int(bits))
  return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def solarize(image, threshold):
  """Inverts the values >= threshold % 256, as the reference executes.

  The reference's `tf.where(image < threshold, image, 255 - image)` compares
  a uint8 image with a Python int, which TensorFlow converts to uint8 by
  wrapping: its level rule's 384 (magnitude 15) acts as 128, 256 as 0.
  """
  wrapped = int(threshold) % 256
  # 255 - v is v XOR 255 for uint8: XOR with 255 where v >= wrapped, else 0.
  flip = tf.cast(image >= tf.constant(wrapped, tf.uint8), tf.uint8) * 255
  return tf.bitwise.bitwise_xor(image, flip)


def solarize_add(image, addition, threshold=128):
  """Adds `addition` (clipped to 0..255) to the values below threshold."""
  x = tf.cast(image, tf.int32)
  added = x + addition * tf.cast(x < threshold, tf.int32)
  return tf.cast(tf.clip_by_value(added, 0, 255), tf.uint8)


def color(image, factor):
  """Blends the image with its grey version (factor 1: unchanged)."""
  return _blend(tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image)),
                image, factor)


def contrast(image, factor):
  """Blends the image with a flat grey image (factor 1: unchanged).

  As in the reference, the grey level is the sum of the grey histogram
  divided by 256, i.e. (height * width) / 256 clipped to 255, not the mean
  luma that PIL's ImageEnhance.Contrast uses: a known quirk of the TF-TPU
  code, kept here because the published recipe trained with it.
  """
  shape = tf.shape(image)
  pixels = tf.cast(shape[0] * shape[1], tf.float32)
  level = tf.cast(tf.clip_by_value(pixels / 256.0, 0.0, 255.0), tf.uint8)
  degenerate = tf.fill(shape, level)
  return _blend(degenerate, image, factor)


def brightness(image, factor):
  """Blends the image with black (factor 1: unchanged)."""
  return _blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor):
  """Blends with a 3x3-smoothed copy (the border pixels stay unsmoothed)."""
  x = tf.cast(image, tf.float32)[None]
  kernel = tf.constant(_SMOOTH, tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], 'VALID')[0]
  smooth = tf.cast(tf.clip_by_value(smooth, 0.0, 255.0), tf.uint8)
  # The smoothed inside framed by the image's own one-pixel border.
  middle = tf.concat([image[1:-1, :1], smooth, image[1:-1, -1:]], axis=1)
  degenerate = tf.concat([image[:1], middle, image[-1:]], axis=0)
  return _blend(degenerate, image, factor)


def _transform(image, matrix):
  """Applies a projective transform, nearest pixel, grey fill.

  `matrix` [a0, a1, a2, b0, b1, b2, c0, c1] maps each output pixel (x, y)
  to the input point ((a0 x + a1 y + a2) / k, (b0 x + b1 y + b2) / k),
  k = c0 x + c1 y + 1, as `tf.contrib.image.transform` that the reference
  calls. The reference marks emptied pixels with an extra channel and then
  writes 128 into them; with nearest sampling that equals filling with 128.
  """
  matrix = tf.cast(tf.stack(matrix), tf.float32)[None]
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=matrix,
      output_shape=tf.shape(image)[:2],
      fill_value=tf.constant(FILL_VALUE, tf.float32),
      interpolation='NEAREST', fill_mode='CONSTANT')
  return out[0]


def rotate(image, degrees):
  """Rotates about the image centre by `degrees` (positive: clockwise)."""
  radians = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  shape = tf.cast(tf.shape(image), tf.float32)
  h, w = shape[0] - 1.0, shape[1] - 1.0
  cos, sin = tf.cos(radians), tf.sin(radians)
  # tf.contrib.image.rotate's matrix: the centre ((w, h) / 2) stays put.
  x_offset = (w - (cos * w - sin * h)) / 2.0
  y_offset = (h - (sin * w + cos * h)) / 2.0
  return _transform(image, [cos, -sin, x_offset, sin, cos, y_offset, 0., 0.])


def shear_x(image, level):
  """Output pixel (x, y) is input pixel (x + level * y, y)."""
  return _transform(image, [1., level, 0., 0., 1., 0., 0., 0.])


def shear_y(image, level):
  """Output pixel (x, y) is input pixel (x, y + level * x)."""
  return _transform(image, [1., 0., 0., level, 1., 0., 0., 0.])


def _shift(image, pixels, axis):
  """Output index i along `axis` (0: y, 1: x) is input index i + pixels.

  By slicing, about an eighth of `_transform`'s time (about 1 ms per
  224x224 image on one core); for a whole number of pixels, where nearest
  sampling hits input pixels exactly, the result is the same.
  """
  size = tf.shape(image)[axis]
  shift = tf.cast(tf.clip_by_value(pixels, -tf.cast(size, tf.float32),
                                   tf.cast(size, tf.float32)), tf.int32)
  start, stop = tf.maximum(shift, 0), size + tf.minimum(shift, 0)
  kept = image[start:stop] if axis == 0 else image[:, start:stop]

  def grey(n):
    shape = tf.tensor_scatter_nd_update(tf.shape(image), [[axis]], [n])
    return tf.fill(shape, tf.constant(FILL_VALUE, tf.uint8))
  return tf.concat([grey(tf.maximum(-shift, 0)), kept,
                    grey(tf.maximum(shift, 0))], axis=axis)


def _translate(image, pixels, axis):
  pixels = tf.cast(pixels, tf.float32)
  matrix = ([1., 0., pixels, 0., 1., 0., 0., 0.] if axis == 1 else
            [1., 0., 0., 0., 1., pixels, 0., 0.])
  return tf.cond(tf.equal(tf.round(pixels), pixels),
                 lambda: _shift(image, pixels, axis),
                 lambda: _transform(image, matrix))


def translate_x(image, pixels):
  """Output pixel (x, y) is input pixel (x + pixels, y): content moves left."""
  return _translate(image, pixels, axis=1)


def translate_y(image, pixels):
  """Output pixel (x, y) is input pixel (x, y + pixels): content moves up."""
  return _translate(image, pixels, axis=0)


def cutout(image, pad_size, center):
  """Greys the square [cy - pad_size, cy + pad_size) x [cx - pad_size,
  cx + pad_size) (clipped), `center` = [cy, cx]."""
  shape = tf.shape(image)
  top = tf.clip_by_value(center[0] - pad_size, 0, shape[0])
  bottom = tf.clip_by_value(center[0] + pad_size, 0, shape[0])
  left = tf.clip_by_value(center[1] - pad_size, 0, shape[1])
  right = tf.clip_by_value(center[1] + pad_size, 0, shape[1])
  # Rows top..bottom are rebuilt as image | grey | image, by slicing.
  grey = tf.fill([bottom - top, right - left, 3],
                 tf.constant(FILL_VALUE, tf.uint8))
  band = tf.concat([image[top:bottom, :left], grey,
                    image[top:bottom, right:]], axis=1)
  return tf.concat([image[:top], band, image[bottom:]], axis=0)


def apply_op(image, name, magnitude, *, negate=False, cutout_center=None):
  """Applies op `name` at `magnitude` (e.g. 15); `negate` flips the sign of
  a SIGNED_OPS argument, `cutout_center` ([cy, cx]) defaults to the centre.
  """
  arg = op_argument(name, magnitude)
  if name in SIGNED_OPS:
    arg = tf.where(negate, -arg, arg)
  if name == 'Cutout':
    if cutout_center is None:
      cutout_center = tf.shape(image)[:2] // 2
    return cutout(image, arg, tf.cast(cutout_center, tf.int32))
  out = _OPS[name](image, arg)
  out.set_shape(image.shape)
  return out


# The ops by name, in the order of the reference's `available_ops` list (an
# op's index is its position here).
_OPS = {
    'AutoContrast': lambda x, _: auto_contrast(x),
    'Equalize': lambda x, _: equalize(x), 'Invert': lambda x, _: 255 - x,
    'Rotate': rotate, 'Posterize': posterize, 'Solarize': solarize,
    'Color': color, 'Contrast': contrast, 'Brightness': brightness,
    'Sharpness': sharpness, 'ShearX': shear_x, 'ShearY': shear_y,
    'TranslateX': translate_x, 'TranslateY': translate_y,
    'Cutout': None,  # apply_op gives it its centre too.
    'SolarizeAdd': solarize_add,
}
OPS = tuple(_OPS)


# ---------------------------------------------------------- RandAugment.


def layer_draws(seed, num_layers, image_shape):
  """Every random choice RandAugment makes for one image, from its seed:
  per layer 'ops' (indices into OPS, with replacement), 'negate' (the
  geometric ops' sign) and 'cutout_center' ([cy, cx], uniform over the
  image)."""
  seeds = tf.random.experimental.stateless_split(
      tf.cast(seed, tf.int64), 4)
  ops = tf.random.stateless_uniform([num_layers], seeds[0], maxval=len(OPS),
                                    dtype=tf.int32)
  negate = tf.random.stateless_uniform([num_layers], seeds[1]) < 0.5
  hw = tf.cast(image_shape[:2], tf.int32)
  cy = tf.random.stateless_uniform([num_layers], seeds[2], maxval=hw[0],
                                   dtype=tf.int32)
  cx = tf.random.stateless_uniform([num_layers], seeds[3], maxval=hw[1],
                                   dtype=tf.int32)
  return {'ops': ops, 'negate': negate,
          'cutout_center': tf.stack([cy, cx], axis=-1)}


class RandAugment:
  """Called on a uint8 (H, W, 3) image and a (2,) int seed, eagerly or in a
  tf.data map; each layer runs only its chosen op (`tf.switch_case`)."""

  def __init__(self, num_layers=2, magnitude=15):
    self.num_layers, self.magnitude = int(num_layers), magnitude

  def __call__(self, image, seed):
    draws = layer_draws(seed, self.num_layers, tf.shape(image))
    for layer in range(self.num_layers):
      image = tf.switch_case(draws['ops'][layer], [
          functools.partial(apply_op, image, name, self.magnitude,
                            negate=draws['negate'][layer],
                            cutout_center=draws['cutout_center'][layer])
          for name in OPS])
    return image
