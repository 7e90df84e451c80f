"""Image preprocessing ops for the tf.data pipelines (TensorFlow, CPU).

Every op works on single examples, both eagerly and inside `tf.data` maps.
Random ops are stateless: they take a `seed`, an int tensor of shape (2,), so
a given example gets the same augmentation on every run and after a resume,
whatever the number of parallel map calls.

Images enter as uint8 HxWxC tensors or as encoded JPEG/PNG strings (what TFDS
yields with `tfds.decode.SkipDecoding`). Encoded JPEGs are cropped while
decoding (`tf.image.decode_and_crop_jpeg`), which skips most of the decode
work for small crops; JPEG decoding dominates the pipeline's CPU time.

All outputs are float32 in [-1, 1]: `(x - 127.5) / 127.5`, as the official
Mixer code.
"""

import contextlib
import functools

import tensorflow as tf

# TensorFlow only preprocesses here: keep it on the CPU so that it takes no
# accelerator memory from JAX. Only possible before TF has touched a GPU.
try:
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:
  pass

# Aspect ratios of random crops (Inception / vit_jax defaults).
_ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)


def normalize(image):
  """Maps pixel values 0..255 (any dtype) to float32 [-1, 1]."""
  return (tf.cast(image, tf.float32) - 127.5) / 127.5


def _rgb(image):
  """Returns a uint8 image with exactly 3 channels (grey is repeated)."""
  image = tf.convert_to_tensor(image)
  if image.shape.rank != 3:
    raise ValueError(f'Expected an HxWxC image, got shape {image.shape}.')
  if image.shape[-1] == 1:
    image = tf.image.grayscale_to_rgb(image)
  elif image.shape[-1] != 3:
    raise ValueError(
        f'Expected 1 or 3 image channels, got {image.shape[-1]}; convert '
        'RGBA or other layouts to RGB before training.')
  return tf.cast(image, tf.uint8) if image.dtype != tf.uint8 else image


def decode(image):
  """Decodes an encoded image string, or passes a uint8 image through.

  Args:
    image: a scalar string tensor (JPEG, PNG, GIF or BMP bytes) or an HxWxC
      uint8 tensor with C in {1, 3}.

  Returns:
    uint8 tensor of shape (H, W, 3).
  """
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
  """Samples a crop window as `tf.image.sample_distorted_bounding_box`.

  The official fine-tuning crop (vit_jax) and the Inception crop used for
  ImageNet pretraining (big_vision `inception_crop`) both draw the window
  this way: area uniform in [area_min, 1] of the image, aspect ratio in
  [3/4, 4/3], whole image after 100 failed attempts.

  Args:
    image_shape: int tensor [height, width, channels].
    seed: int tensor of shape (2,).
    area_min: smallest crop area as a fraction of the image.

  Returns:
    int32 tensor [y, x, height, width].
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
  """Random crop (`random_crop_window`) of an encoded or decoded image.

  JPEGs are decoded only inside the window, the size coming from their
  header; other formats are decoded once, then cropped.

  Args:
    image: encoded string or uint8 HxWxC tensor.
    seed: int tensor of shape (2,).
    area_min: smallest crop area as a fraction of the image.

  Returns:
    uint8 tensor (h, w, 3).
  """
  image = tf.convert_to_tensor(image)

  def crop(decoded):
    window = random_crop_window(tf.shape(decoded), seed, area_min)
    return decode_and_crop(decoded, window)

  if image.dtype != tf.string:
    return crop(_rgb(image))

  def jpeg():
    window = random_crop_window(tf.image.extract_jpeg_shape(image), seed,
                                area_min)
    return tf.image.decode_and_crop_jpeg(image, window, channels=3)

  cropped = tf.cond(tf.io.is_jpeg(image), jpeg, lambda: crop(decode(image)))
  cropped.set_shape([None, None, 3])
  return cropped


def resize(image, image_size):
  """Resizes (bilinear, no antialiasing, as official) to a float32 square."""
  image = tf.image.resize(image, [image_size, image_size], method='bilinear')
  image.set_shape([image_size, image_size, 3])
  return image


def resize_small(image, size):
  """Resizes so that the shorter side is `size`, keeping the aspect ratio."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = tf.cast(size, tf.float32) / tf.reduce_min(shape)
  new = tf.cast(tf.round(shape * scale), tf.int32)
  new = tf.maximum(new, size)  # Guards the short side against rounding.
  return tf.image.resize(image, new, method='bilinear')


def central_crop(image, size):
  """Crops the central size x size square of an image at least that big."""
  shape = tf.shape(image)
  y, x = (shape[0] - size) // 2, (shape[1] - size) // 2
  image = image[y:y + size, x:x + size]
  image.set_shape([size, size, 3])
  return image


def random_flip(image, seed):
  """Flips left-right with probability 1/2."""
  return tf.image.stateless_random_flip_left_right(image, seed)


def train_image(image, seed, *, image_size, crop='inception',
                area_min=0.05, flip=True, randaugment=None):
  """Training augmentation of one image.

  Args:
    image: encoded string or uint8 HxWxC tensor.
    seed: int tensor of shape (2,), this example's randomness.
    image_size: output side.
    crop: 'inception' or 'finetune' (random crop by
      sample_distorted_bounding_box, see `random_crop_window`) or 'resize'
      (no crop).
    area_min: smallest crop area (fraction), for the random crops.
    flip: random left-right flip.
    randaugment: None or a `RandAugment`, applied to the resized image in
      0..255.

  Returns:
    float32 (image_size, image_size, 3) in [-1, 1].
  """
  image = tf.convert_to_tensor(image)
  seeds = tf.random.experimental.stateless_split(seed, 3)
  if crop in ('inception', 'finetune'):
    image = decode_and_random_crop(image, seeds[0], area_min)
  elif crop == 'resize':
    image = decode(image)
  else:
    raise ValueError(
        f"Unknown train crop {crop!r}: use 'inception', 'finetune' or "
        "'resize' (config.pp.train_crop).")
  image = resize(image, image_size)
  if flip:
    image = random_flip(image, seeds[1])
  if randaugment is not None:
    image = randaugment(image, seeds[2])
  return normalize(image)


def eval_image(image, image_size, crop='resize', resize_size=256):
  """Deterministic evaluation preprocessing of one image.

  Args:
    image: uint8 HxWx3 (or HxWx1) tensor, or an encoded image string.
    image_size: output side.
    crop: 'resize' resizes the whole image to image_size (the official
      fine-tuning eval); 'resize_crop' resizes the short side to
      resize_size and takes the central image_size crop (ImageNet eval).
    resize_size: short side before the central crop ('resize_crop' only).

  Returns:
    float32 (image_size, image_size, 3) in [-1, 1].
  """
  image = decode(image)
  if crop == 'resize':
    image = resize(image, image_size)
  elif crop == 'resize_crop':
    if resize_size < image_size:
      raise ValueError(
          f'eval resize size {resize_size} is smaller than the crop '
          f'{image_size}; set config.pp.eval_resize >= config.image_size.')
    image = central_crop(resize_small(image, resize_size), image_size)
  else:
    raise ValueError(
        f"Unknown eval crop {crop!r}: use 'resize' or 'resize_crop' "
        '(config.pp.eval_crop).')
  return normalize(image)


def one_hot(label, num_classes):
  """Integer label -> float32 one-hot vector."""
  return tf.one_hot(label, num_classes, dtype=tf.float32)


def mixup(images, labels, seed, *, alpha, prob):
  """Mixup of one batch with itself rolled by one example.

  With probability `prob` the batch is mixed: lam ~ Beta(alpha, alpha),
  images = lam * x + (1 - lam) * roll(x), labels likewise; otherwise it is
  returned unchanged. One lam per batch, as big_vision.

  Args:
    images: float (B, H, W, C).
    labels: float (B, num_classes), one-hot.
    seed: int tensor of shape (2,), this batch's randomness.
    alpha: Beta concentration (> 0).
    prob: probability that the batch is mixed.

  Returns:
    (images, labels), same shapes and dtypes.
  """
  if alpha <= 0:
    raise ValueError(f'mixup alpha must be > 0, got {alpha} '
                     '(config.pp.mixup_alpha).')
  seeds = tf.random.experimental.stateless_split(seed, 3)
  g1 = tf.random.stateless_gamma([], seeds[0], alpha=alpha)
  g2 = tf.random.stateless_gamma([], seeds[1], alpha=alpha)
  lam = g1 / (g1 + g2)
  mix = tf.random.stateless_uniform([], seeds[2]) < prob
  lam = tf.where(mix, lam, 1.0)
  mixed_images = lam * images + (1.0 - lam) * tf.roll(images, 1, axis=0)
  mixed_labels = lam * labels + (1.0 - lam) * tf.roll(labels, 1, axis=0)
  return (tf.cast(mixed_images, images.dtype),
          tf.cast(mixed_labels, labels.dtype))


@functools.cache
def _keras_rand_augment_class():
  """Builds the RandAugment class on first use (importing Keras is slow)."""
  import keras  # pylint: disable=g-import-not-at-top

  class _PerExampleSeeds(keras.random.SeedGenerator):
    """Keras seed source that derives every draw from one seed tensor.

    Keras random ops accept a SeedGenerator and call `next()` once per draw.
    The stock generator keeps its state in a variable, which makes results
    depend on the order in which parallel tf.data calls run. This one folds
    a draw counter into the example's seed instead; the counter advances
    while the map function is traced, so each draw site gets a fixed, distinct
    seed. No variable is created, so the base constructor is not called.
    """

    def __init__(self, seed):  # pylint: disable=super-init-not-called
      self._seed = tf.cast(seed, tf.int64)
      self._draws = 0

    def next(self, ordered=True):
      del ordered
      self._draws += 1
      return tf.random.experimental.stateless_fold_in(self._seed, self._draws)

  class SeededRandAugment(keras.layers.RandAugment):
    """keras.layers.RandAugment with per-example stateless seeds."""

    def _get_seed_generator(self, backend=None):
      del backend
      return self.__dict__['_example_seeds']

    def transform_images(self, images, transformation, training=True):
      # Keras computes all 11 candidate ops and keeps one with `where`; a
      # switch runs only the chosen op. Same ops and parameters, about 5x
      # less work on CPU.
      if not training:
        return tf.cast(images, self.compute_dtype)
      images = tf.cast(images, self.compute_dtype)
      transforms = transformation['transforms']
      for i in range(self.num_ops):
        branches = [
            functools.partial(
                lambda name, x: tf.cast(getattr(self, name).transform_images(
                    x, transforms[name]), self.compute_dtype), name, images)
            for name in self._AUGMENT_LAYERS
        ]
        images = tf.switch_case(transformation['layer_idxes'][i], branches)
      return images

    @contextlib.contextmanager
    def seeded(self, seed):
      """Within the block, the layer draws its randomness from `seed`."""
      # Keras layers refuse new tracked attributes once built; the seeds are
      # per call, not state, so they bypass tracking.
      self.__dict__['_example_seeds'] = _PerExampleSeeds(seed)
      try:
        yield self
      finally:
        self.__dict__['_example_seeds'] = None

    def augment(self, image, seed):
      with self.seeded(seed):
        return self(image, training=True)

  return SeededRandAugment


class RandAugment:
  """RandAugment(num_ops, magnitude) from Keras, seeded per example.

  Uses `keras.layers.RandAugment` (Keras 3): a maintained implementation
  that documents itself as safe inside tf.data with any Keras backend, and
  which builds on Keras's own preprocessing layers (shear, translation,
  rotation, brightness, colour, contrast, sharpness, posterize, solarize,
  auto-contrast, equalize). Two changes, both outside Keras's maths: its
  randomness is drawn from the example's seed (so pipelines are
  reproducible and resumable), and only the chosen op is computed.

  Keras takes a strength `factor` in [0, 1]; the RandAugment paper's
  magnitude runs 0..30 (ImageNet recipes use 9-15 on that scale), so
  factor = magnitude / 30 (15 -> 0.5, Keras's default). The op list and
  strength scaling follow Keras, not big_vision's TF1 autoaugment port, so
  the augmentation is close to, not identical with, the paper's recipe.
  """

  def __init__(self, num_ops=2, magnitude=15):
    if num_ops < 1 or not 0 <= magnitude <= 30:
      raise ValueError(
          f'RandAugment needs num_ops >= 1 and magnitude in [0, 30], got '
          f'{num_ops}, {magnitude} (config.pp.randaugment_*).')
    self.num_ops = num_ops
    self.magnitude = magnitude
    self._layer = _keras_rand_augment_class()(
        value_range=(0, 255), num_ops=num_ops, factor=magnitude / 30)

  def __call__(self, image, seed):
    """Augments one float HxWx3 image in 0..255 with its (2,) seed."""
    image = self._layer.augment(tf.cast(image, tf.float32), seed)
    return tf.clip_by_value(image, 0.0, 255.0)
