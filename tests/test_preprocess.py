"""Tests of mixer_jax.preprocess: every op eagerly and inside tf.data."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mixer_jax import preprocess


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


def test_random_flip_is_identity_or_mirror_and_both_happen():
  image = tf.constant(_noise((5, 6, 3)).astype(np.float32))
  flipped = 0
  for i in range(30):
    out = preprocess.random_flip(image, _seed(i)).numpy()
    if np.array_equal(out, image.numpy()[:, ::-1]):
      flipped += 1
    else:
      np.testing.assert_array_equal(out, image.numpy())
  assert 5 < flipped < 25


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


def test_train_image_unknown_crop():
  with pytest.raises(ValueError, match='train_crop'):
    preprocess.train_image(tf.zeros([8, 8, 3], tf.uint8), _seed(0),
                           image_size=8, crop='bogus')


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


def _ramp_batch(batch=6, classes=4):
  # Image i is constant i, label i % classes: the mix weight is readable.
  images = tf.reshape(tf.repeat(tf.range(batch, dtype=tf.float32), 12),
                      [batch, 2, 2, 3])
  labels = tf.one_hot(tf.range(batch) % classes, classes)
  return images, labels


def test_mixup_mixes_images_and_labels_alike():
  images, labels = _ramp_batch()
  lams = []
  for i in range(300):
    out_images, out_labels = preprocess.mixup(images, labels, _seed(i),
                                              alpha=0.5, prob=0.5)
    # Image 0 = lam * 0 + (1 - lam) * 5 (rolled from the last one).
    lam = 1 - out_images[0, 0, 0, 0].numpy() / 5
    lams.append(lam)
    expected = lam * labels + (1 - lam) * tf.roll(labels, 1, axis=0)
    np.testing.assert_allclose(out_labels, expected, atol=1e-5)
    np.testing.assert_allclose(tf.reduce_sum(out_labels, 1), 1.0, atol=1e-5)
  lams = np.array(lams)
  mixed = lams[np.abs(lams - 1) > 1e-6]
  assert 0.35 < len(mixed) / len(lams) < 0.65  # prob = 0.5.
  # Beta(0.5, 0.5): mean 1/2, U-shaped (most mass near 0 and 1).
  assert abs(mixed.mean() - 0.5) < 0.1
  assert np.mean((mixed < 0.2) | (mixed > 0.8)) > 0.45


def test_mixup_in_tf_data_equals_eager_and_prob_zero_is_identity():
  images, labels = _ramp_batch()
  fn = lambda x, y, s: preprocess.mixup(x, y, s, alpha=0.2, prob=1.0)
  eager = fn(images, labels, _seed(4))
  graph = _in_tf_data(fn, images, labels, _seed(4))
  np.testing.assert_allclose(graph[0], eager[0], atol=1e-6)
  np.testing.assert_allclose(graph[1], eager[1], atol=1e-6)
  same = preprocess.mixup(images, labels, _seed(4), alpha=0.2, prob=0.0)
  np.testing.assert_array_equal(same[0], images)
  np.testing.assert_array_equal(same[1], labels)
  with pytest.raises(ValueError, match='alpha'):
    preprocess.mixup(images, labels, _seed(0), alpha=0.0, prob=1.0)


@pytest.fixture(scope='module')
def randaugment():
  return preprocess.RandAugment(num_ops=2, magnitude=15)


def test_randaugment_is_seeded_per_example(randaugment):
  image = tf.constant(_noise((24, 24, 3)).astype(np.float32))
  first = randaugment(image, _seed(5)).numpy()
  assert first.shape == (24, 24, 3)
  assert 0 <= first.min() and first.max() <= 255
  np.testing.assert_array_equal(randaugment(image, _seed(5)), first)
  np.testing.assert_allclose(
      _in_tf_data(randaugment, image, _seed(5)), first, atol=1e-3)
  changed = [not np.array_equal(randaugment(image, _seed(i)), image)
             for i in range(10)]
  assert sum(changed) >= 7
  # Parallel tf.data calls give the same result per seed as sequential ones.
  ds = tf.data.Dataset.range(8).map(
      lambda i: randaugment(image, tf.stack([i, i])), num_parallel_calls=4)
  for i, out in enumerate(ds.as_numpy_iterator()):
    np.testing.assert_allclose(
        out, randaugment(image, tf.constant([i, i], tf.int64)), atol=1e-3)


def test_randaugment_equals_keras_computation(randaugment):
  # The switch-based transform must match Keras's own (compute all ops,
  # keep the chosen one) for the same random draws.
  image = tf.constant(_noise((20, 20, 3), 3).astype(np.float32))
  layer = randaugment._layer  # pylint: disable=protected-access
  for i in range(12):
    with layer.seeded(_seed(i)):
      transformation = layer.get_random_transformation(image)
    reference = keras.layers.RandAugment.transform_images(
        layer, image[None], transformation)[0]
    np.testing.assert_allclose(
        randaugment(image, _seed(i)),
        tf.clip_by_value(reference, 0, 255), atol=1e-3)


def test_randaugment_rejects_bad_settings():
  with pytest.raises(ValueError, match='randaugment'):
    preprocess.RandAugment(num_ops=2, magnitude=31)
