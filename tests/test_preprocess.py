"""Tests of mixer_jax.data.preprocess: every op eagerly and inside tf.data."""

import numpy as np
import pytest
import tensorflow as tf

from mixer_jax.data import preprocess
from mixer_jax.data import randaugment


def _in_tf_data(fn, *args):
  """Runs fn(*args) as a tf.data map and returns the numpy result."""
  ds = tf.data.Dataset.from_tensors(args).map(fn)
  return next(iter(ds)).numpy() if not isinstance(
      ds.element_spec, tuple) else [t.numpy() for t in next(iter(ds))]


def _noise(shape, seed=0):
  return np.random.RandomState(seed).randint(0, 256, shape).astype(np.uint8)


def _seed(i):
  return tf.constant([i, 17], tf.int64)


def test_normalize_endpoints():
  np.testing.assert_allclose(
      preprocess.normalize(tf.constant([0, 255, 127.5])), [-1, 1, 0])


def test_decode_grey_png_to_three_equal_channels():
  grey = _noise((9, 7, 1))
  png = tf.io.encode_png(grey)
  for out in (preprocess.decode(png).numpy(),
              _in_tf_data(preprocess.decode, png)):
    assert out.shape == (9, 7, 3) and out.dtype == np.uint8
    for c in range(3):
      np.testing.assert_array_equal(out[..., c], grey[..., 0])
  # Decoded uint8 images pass through, grey ones gain channels.
  np.testing.assert_array_equal(
      preprocess.decode(tf.constant(grey))[..., 2], grey[..., 0])


def test_decode_rejects_four_channels():
  with pytest.raises(ValueError, match='channels'):
    preprocess.decode(tf.zeros([4, 4, 4], tf.uint8))


@pytest.mark.parametrize('encode', ['jpeg', 'png', 'raw'])
def test_decode_and_crop_equals_crop_of_decode(encode):
  image = _noise((40, 30, 3))
  if encode == 'jpeg':
    data = tf.io.encode_jpeg(image, quality=95)
  elif encode == 'png':
    data = tf.io.encode_png(image)
  else:
    data = tf.constant(image)
  full = preprocess.decode(data).numpy()
  window = tf.constant([5, 3, 20, 17])
  expected = full[5:25, 3:20]
  for out in (preprocess.decode_and_crop(data, window).numpy(),
              _in_tf_data(preprocess.decode_and_crop, data, window)):
    assert out.shape == (20, 17, 3)
    if encode == 'jpeg':
      # libjpeg upsamples chroma across the crop's right edge differently
      # from a full decode; every other column is bit-identical.
      np.testing.assert_array_equal(out[:, :-1], expected[:, :-1])
    else:
      np.testing.assert_array_equal(out, expected)


def test_random_crop_window_respects_area_and_bounds():
  shape = tf.constant([60, 80, 3])
  windows = [preprocess.random_crop_window(shape, _seed(i), 0.3).numpy()
             for i in range(40)]
  for y, x, h, w in windows:
    assert 0 <= y and y + h <= 60 and 0 <= x and x + w <= 80
    assert h * w >= 0.3 * 60 * 80 * 0.95  # Rounding to whole pixels.
    assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1 or (h, w) == (60, 80)
  assert len({tuple(w) for w in windows}) > 20  # Really random.
  np.testing.assert_array_equal(
      windows[3], preprocess.random_crop_window(shape, _seed(3), 0.3))
  np.testing.assert_array_equal(
      windows[3], _in_tf_data(lambda s: preprocess.random_crop_window(
          s, _seed(3), 0.3), shape))


@pytest.mark.parametrize('encode', ['jpeg', 'png', 'raw'])
def test_decode_and_random_crop_uses_the_sampled_window(encode):
  image = _noise((60, 80, 3))
  data = {'jpeg': lambda: tf.io.encode_jpeg(image, quality=95),
          'png': lambda: tf.io.encode_png(image),
          'raw': lambda: tf.constant(image)}[encode]()
  for i in range(3):
    y, x, h, w = preprocess.random_crop_window(
        tf.constant([60, 80, 3]), _seed(i), 0.2).numpy()
    expected = preprocess.decode_and_crop(data, tf.constant([y, x, h, w]))
    for out in (preprocess.decode_and_random_crop(data, _seed(i), 0.2),
                _in_tf_data(lambda d: preprocess.decode_and_random_crop(
                    d, _seed(i), 0.2), data)):
      np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize('crop', ['inception', 'finetune', 'resize'])
def test_train_image_shape_range_determinism(crop):
  image = tf.io.encode_jpeg(_noise((50, 70, 3)))
  fn = lambda im, s: preprocess.train_image(im, s, image_size=24, crop=crop)
  eager = fn(image, _seed(1)).numpy()
  assert eager.shape == (24, 24, 3) and eager.dtype == np.float32
  assert -1 <= eager.min() and eager.max() <= 1
  np.testing.assert_allclose(_in_tf_data(fn, image, _seed(1)), eager,
                             atol=1e-6)
  np.testing.assert_array_equal(fn(image, _seed(1)), eager)
  if crop != 'resize':
    assert not np.array_equal(fn(image, _seed(2)).numpy(), eager)


def _framed(size, border):
  """White square image with a black frame `border` pixels wide."""
  image = np.zeros((size, size, 3), np.uint8)
  image[border:size - border, border:size - border] = 255
  return image


def test_eval_resize_crop_keeps_only_the_centre():
  image = _framed(400, 72)  # White centre of 256 px.
  for fn in (preprocess.eval_image,
             lambda im, *a: _in_tf_data(
                 lambda x: preprocess.eval_image(x, *a), im)):
    out = np.asarray(fn(tf.constant(image), 100, 'resize_crop', 200))
    # Short side 400 -> 200 halves the frame to 36 px; the central 100 px
    # lie inside the white 128 px centre.
    assert out.shape == (100, 100, 3)
    np.testing.assert_allclose(out, 1.0, atol=1e-5)


def test_eval_plain_resize_keeps_the_frame():
  out = preprocess.eval_image(tf.constant(_framed(400, 72)), 100).numpy()
  assert out.shape == (100, 100, 3)
  np.testing.assert_allclose(out[0, 0], -1.0)
  np.testing.assert_allclose(out[50, 50], 1.0)


def test_eval_image_accepts_encoded_and_rejects_bad_options():
  png = tf.io.encode_png(_framed(40, 0))
  np.testing.assert_allclose(preprocess.eval_image(png, 8), 1.0)
  with pytest.raises(ValueError, match='eval_resize'):
    preprocess.eval_image(png, 224, 'resize_crop', 200)
  with pytest.raises(ValueError, match='eval_crop'):
    preprocess.eval_image(png, 8, 'bogus')


def test_train_image_with_randaugment_is_seeded_per_example():
  # RandAugment itself is tested in test_randaugment.py; here its place in
  # train_image: after the resize, on uint8, before normalisation.
  image = tf.constant(_noise((30, 30, 3)))
  augment = randaugment.RandAugment(2, 15)
  fn = lambda im, s: preprocess.train_image(
      im, s, image_size=24, crop='resize', flip=False, randaugment=augment)
  first = fn(image, _seed(5)).numpy()
  assert first.shape == (24, 24, 3) and -1 <= first.min() <= first.max() <= 1
  np.testing.assert_array_equal(fn(image, _seed(5)), first)
  np.testing.assert_array_equal(_in_tf_data(fn, image, _seed(5)), first)
  plain = preprocess.resize(preprocess.decode(image), 24)
  # RandAugment's uint8 input: the resized floats truncated, as big_vision.
  uint8 = tf.cast(tf.clip_by_value(plain, 0, 255), tf.uint8)
  seeds = tf.random.experimental.stateless_split(_seed(5), 3)
  np.testing.assert_array_equal(
      first, preprocess.normalize(augment(uint8, seeds[2])))
  changed = [not np.array_equal(fn(image, _seed(i)), first)
             for i in range(6, 14)]
  assert sum(changed) >= 6


def test_resize_small_area_averages_blocks():
  # 3x3 blocks of a 9x12 image: 'area' to short side 3 gives block means;
  # bilinear (no antialiasing) samples only each block's centre pixel. The
  # result is uint8, so the means are truncated (within one level).
  image = _noise((9, 12, 3))
  out = preprocess.resize_small(tf.constant(image), 3, 'area').numpy()
  assert out.shape == (3, 4, 3) and out.dtype == np.uint8
  means = image.astype(np.float64).reshape(3, 3, 4, 3, 3).mean(axis=(1, 3))
  assert np.all((out <= means + 1e-3) & (out > means - 1))
  bilinear = preprocess.resize_small(tf.constant(image), 3, 'bilinear')
  np.testing.assert_array_equal(bilinear, image[1::3, 1::3])
  with pytest.raises(ValueError, match='eval_resize_method'):
    preprocess.resize_small(tf.constant(image), 3, 'lanczos9')


# A 4x4 grey image whose 2x2 block means are exact binary fractions (x.25,
# x.5, x.75), so halving it by 'area' or by bilinear sampling (which, at
# this scale, averages the same 2x2 blocks) is computed without rounding on
# any CPU: the uint8 big_vision makes of them is the truncated mean.
BLOCKS = np.array([[10, 11, 200, 201],
                   [12, 12, 202, 203],
                   [0, 255, 7, 7],
                   [255, 255, 8, 9]], np.uint8)
BLOCK_MEANS = np.array([[11.25, 201.5], [191.25, 7.75]])
TRUNCATED = np.array([[11, 201], [191, 7]])  # Rounding would give 202, 8.


def _grey(image):
  return np.repeat(image[..., None], 3, axis=-1)


def _normalized(values):
  """The official (x - 127.5) / 127.5, in float32 as the pipeline computes."""
  return (_grey(values).astype(np.float32) - np.float32(127.5)) / np.float32(
      127.5)


@pytest.mark.parametrize('encode', ['png', 'raw'])
def test_big_vision_eval_resize_truncates_to_uint8(encode):
  # resize_small(2, 'area')|central_crop(2) of big_vision, by hand.
  image = _grey(BLOCKS)
  data = tf.io.encode_png(image) if encode == 'png' else tf.constant(image)
  expected = _normalized(TRUNCATED)
  for fn in (preprocess.eval_image,
             lambda im, *a: _in_tf_data(
                 lambda x: preprocess.eval_image(x, *a), im)):
    np.testing.assert_array_equal(
        fn(data, 2, 'resize_crop', 2, 'area'), expected)
    # big_vision's few-shot resize(2)|central_crop(2): bilinear, truncated.
    np.testing.assert_array_equal(fn(data, 2, 'squash_crop', 2), expected)
  # vit_jax's fine-tuning eval keeps the float.
  np.testing.assert_array_equal(preprocess.eval_image(data, 2, 'resize'),
                                _normalized(BLOCK_MEANS))


def test_inception_crop_truncates_to_uint8_and_finetune_crop_keeps_float():
  # Crop area 1 of a square image: the window is the whole image, so the
  # output is the bilinear halving of BLOCKS.
  image = tf.constant(_grey(BLOCKS))
  expected = {'inception': TRUNCATED, 'finetune': BLOCK_MEANS}
  for crop, values in expected.items():
    fn = lambda im, s, crop=crop: preprocess.train_image(
        im, s, image_size=2, crop=crop, area_min=1.0, flip=False)
    for seed in range(3):
      np.testing.assert_array_equal(fn(image, _seed(seed)),
                                    _normalized(values))
    np.testing.assert_array_equal(_in_tf_data(fn, image, _seed(0)),
                                  _normalized(values))


def test_eval_squash_crop_resizes_the_whole_image_then_crops():
  image = _framed(400, 72)
  # 400 -> 200 square; the central 100 lie inside the white 128 centre.
  out = preprocess.eval_image(tf.constant(image), 100, 'squash_crop', 200)
  np.testing.assert_allclose(out, 1.0, atol=1e-5)
  wide = np.zeros((100, 300, 3), np.uint8)
  wide[:, 100:200] = 255  # Squashed to 60 x 60, the white band is 20 wide.
  out = preprocess.eval_image(tf.constant(wide), 40, 'squash_crop', 60)
  assert out.shape == (40, 40, 3)
  np.testing.assert_allclose(out[:, 12:18], 1.0, atol=1e-5)
  np.testing.assert_allclose(out[:, :8], -1.0, atol=1e-5)


def test_finetune_crop_decodes_the_whole_jpeg_as_vit_jax():
  # vit_jax's train pp, written out with TF's ops: decode the whole image,
  # slice the sampled window, bilinear resize kept in float, (x-127.5)/127.5.
  image = _noise((48, 64, 3), seed=3)  # Chroma-subsampled by encode_jpeg.
  data = tf.io.encode_jpeg(image, quality=90)
  for i in range(4):
    crop_seed = tf.random.experimental.stateless_split(_seed(i), 3)[0]
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        [48, 64, 3], tf.zeros([1, 0, 4]), seed=crop_seed,
        min_object_covered=0.0, aspect_ratio_range=(0.75, 1.33),
        area_range=(0.05, 1.0), max_attempts=100,
        use_image_if_no_bounding_boxes=True)
    y, x, h, w = int(begin[0]), int(begin[1]), int(size[0]), int(size[1])
    full = tf.io.decode_image(data, channels=3)[y:y + h, x:x + w]
    expected = (tf.image.resize(full, [32, 32]) - 127.5) / 127.5
    got = preprocess.train_image(data, _seed(i), image_size=32,
                                 crop='finetune', flip=False)
    np.testing.assert_array_equal(got, expected)
  # The case that tells the two apart: decoding inside this window differs
  # from the whole decode on the window's right edge.
  inside = tf.image.decode_and_crop_jpeg(data, [y, x, h, w], channels=3)
  assert x + w < 64 and not np.array_equal(inside, full)
