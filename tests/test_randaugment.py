"""Tests of mixer_jax.data.randaugment against PIL and NumPy formulas.

Each op is checked against an expectation computed another way (PIL's
ImageOps/ImageEnhance, scipy.ndimage or a NumPy formula of the TF-TPU rule),
eagerly and inside tf.data; RandAugment itself is checked to apply exactly
`num_layers` ops, chosen uniformly, deterministically per seed.
"""

import collections

import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageOps
import pytest
from scipy import ndimage
import tensorflow as tf

from mixer_jax.data import randaugment as ra


def _noise(shape, seed=0, low=0, high=256):
  return np.random.RandomState(seed).randint(low, high, shape).astype(np.uint8)


def _blocks(size=32, block=4, seed=1):
  """Random colour blocks: smooth enough that nearest sampling is stable."""
  small = _noise((size // block, size // block, 3), seed)
  return np.kron(small, np.ones((block, block, 1), np.uint8))


def _both(name, image, magnitude=15, **kwargs):
  """The op's result eagerly and inside a tf.data map (must agree)."""
  eager = ra.apply_op(tf.constant(image), name, magnitude, **kwargs).numpy()
  ds = tf.data.Dataset.from_tensors(tf.constant(image)).map(
      lambda x: ra.apply_op(x, name, magnitude, **kwargs))
  graph = next(iter(ds)).numpy()
  np.testing.assert_array_equal(graph, eager)
  assert eager.dtype == np.uint8 and eager.shape == image.shape
  return eager


def _pil(image):
  return Image.fromarray(image)


def test_op_names_are_the_reference_list_in_order():
  assert ra.OPS == (
      'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize',
      'Solarize', 'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX',
      'ShearY', 'TranslateX', 'TranslateY', 'Cutout', 'SolarizeAdd')


def test_level_rules_at_magnitude_15():
  # Level 15 of 10: past the top of the scale, as in big_vision's recipe.
  expected = {'Rotate': 45.0, 'Posterize': 6, 'Solarize': 384,
              'SolarizeAdd': 165, 'Color': 2.8, 'Contrast': 2.8,
              'Brightness': 2.8, 'Sharpness': 2.8, 'ShearX': 0.45,
              'ShearY': 0.45, 'TranslateX': 150.0, 'TranslateY': 150.0,
              'Cutout': 60, 'AutoContrast': None, 'Equalize': None,
              'Invert': None}
  for name, value in expected.items():
    got = ra.op_argument(name, 15)
    assert got == pytest.approx(value) if value is not None else got is None


def test_invert_posterize_solarize_match_pil():
  image = _noise((12, 10, 3))
  np.testing.assert_array_equal(_both('Invert', image),
                                np.asarray(ImageOps.invert(_pil(image))))
  np.testing.assert_array_equal(_both('Posterize', image),
                                np.asarray(ImageOps.posterize(_pil(image), 6)))
  np.testing.assert_array_equal(
      _both('Solarize', image, magnitude=5),  # Threshold 128.
      np.asarray(ImageOps.solarize(_pil(image), 128)))


@pytest.mark.parametrize('magnitude, executed_threshold', [
    (15, 128),  # int(1.5 * 256) = 384, as uint8: 384 - 256.
    (10, 0),  # 256 as uint8: every value is inverted.
    (5, 128), (3, 76)])  # int(0.3 * 256) = 76, in range: unchanged.
def test_solarize_is_what_the_reference_executes(magnitude, executed_threshold):
  # The reference's op, run as written: a uint8 tensor compared with the
  # Python int of its level rule (TensorFlow converts the int to uint8).
  image = _noise((12, 10, 3))
  level_threshold = int(magnitude / 10 * 256)
  as_written = tf.where(tf.constant(image) < level_threshold,
                        tf.constant(image), 255 - tf.constant(image)).numpy()
  out = _both('Solarize', image, magnitude=magnitude)
  np.testing.assert_array_equal(out, as_written)
  # The same, from PIL's solarize at the wrapped threshold.
  np.testing.assert_array_equal(
      out, np.asarray(ImageOps.solarize(_pil(image), executed_threshold)))
  if magnitude == 15:  # About half the values (those >= 128) change.
    assert 0.4 < np.mean(out != image) < 0.6


def test_solarize_add_formula():
  image = _noise((12, 10, 3))
  wide = image.astype(np.int64)
  expected = np.where(wide < 128, np.minimum(wide + 165, 255), wide)
  np.testing.assert_array_equal(_both('SolarizeAdd', image), expected)


def test_auto_contrast_matches_pil():
  image = _noise((16, 12, 3), low=40, high=200)
  image[..., 2] = 77  # A flat channel is left as it is.
  out = _both('AutoContrast', image)
  # The TF-TPU rule: (x - lo) * 255 / (hi - lo), truncated; computed in
  # integers, with only the CPU-dependent float rounding allowed.
  x = image.astype(np.int64)
  lo, hi = x.min(axis=(0, 1)), x.max(axis=(0, 1))
  stretched = _truncations((x - lo) * 255, np.maximum(hi - lo, 1))
  flat = hi == lo
  _assert_one_of(out, *(np.where(flat, x, s) for s in stretched))
  # PIL computes in float64: the same up to float32 rounding (at most 1).
  expected = np.asarray(ImageOps.autocontrast(_pil(image)))
  np.testing.assert_allclose(out, expected, atol=1)
  assert np.mean(out == expected) > 0.98
  assert out[..., 0].min() == 0 and out[..., 0].max() == 255


def test_equalize_matches_pil():
  image = _noise((16, 12, 3), low=50, high=120)
  np.testing.assert_array_equal(_both('Equalize', image),
                                np.asarray(ImageOps.equalize(_pil(image))))


def _grey(image):
  # tf.image.rgb_to_grayscale on uint8: luma of x / 255, times 255.5,
  # truncated.
  luma = image.astype(np.float64) @ np.array([0.2989, 0.5870, 0.1140]) / 255
  return np.floor(luma * 255.5)


def _blend(degenerate, image, factor):
  # In float32, as the TF-TPU `blend`; truncated to uint8.
  degenerate = np.asarray(degenerate, np.float32)
  out = degenerate + np.float32(factor) * (image.astype(np.float32) -
                                           degenerate)
  return np.floor(np.clip(out, 0, 255)).astype(np.uint8)


def _truncations(numerator, denominator):
  """The uint8 values a float kernel may give for trunc(n / d), n, d ints.

  Exactly: floor(n / d), clipped to 0..255. Where n / d is a whole number a
  float kernel may land just below it (which rounding it sees depends on
  the CPU: FMA, vector width), so k - 1 is allowed there too; elsewhere the
  exact value is at least 1/d from a whole number, far beyond float error.
  Returns (floor, also_allowed) int arrays; also_allowed is -1 where only
  the floor is right.
  """
  numerator = np.asarray(numerator, np.int64)
  exact = np.clip(numerator // denominator, 0, 255)
  whole = (numerator % denominator == 0) & (numerator > 0) & (
      numerator <= 255 * denominator)
  return exact, np.where(whole, exact - 1, -1)


def _blend_exact(degenerate, image):
  """Both truncations of d + 2.8 (x - d) = (5 d + 14 (x - d)) / 5."""
  d = np.asarray(degenerate, np.int64)
  return _truncations(5 * d + 14 * (image.astype(np.int64) - d), 5)


def _assert_one_of(out, *allowed):
  """Each pixel of `out` equals the same pixel of one of `allowed`."""
  ok = np.zeros(out.shape, bool)
  for values in allowed:
    ok |= out.astype(np.int64) == values
  assert ok.all(), (
      f'{np.sum(~ok)} pixels differ from the reference, first at '
      f'{np.argwhere(~ok)[0].tolist()}: {out[tuple(np.argwhere(~ok)[0])]} '
      f'not in {[v[tuple(np.argwhere(~ok)[0])] for v in allowed]}')


def test_color_brightness_contrast_formulas_and_pil():
  image = _noise((16, 16, 3))
  factor = 2.8
  color = _both('Color', image)
  grey = np.repeat(_grey(image)[..., None], 3, axis=-1)
  np.testing.assert_allclose(color, _blend(grey, image, factor), atol=1)
  pil_color = np.asarray(ImageEnhance.Color(_pil(image)).enhance(factor))
  assert np.mean(np.abs(color.astype(int) - pil_color) <= 3) > 0.97
  brightness = _both('Brightness', image)
  np.testing.assert_array_equal(
      brightness, _blend(np.zeros_like(image, np.float64), image, factor))
  pil_bright = np.asarray(ImageEnhance.Brightness(_pil(image)).enhance(factor))
  np.testing.assert_allclose(brightness, pil_bright, atol=1)
  # The TF-TPU contrast target: (height * width) / 256 grey, not the mean.
  contrast = _both('Contrast', image)
  target = np.full(image.shape, 16 * 16 // 256)
  _assert_one_of(contrast, *_blend_exact(target, image))
  # A wrong factor or target fails: 2.7, or the mean luma PIL would use.
  assert not np.array_equal(contrast, _blend(target, image, 2.7))
  mean_target = np.full(image.shape, int(_grey(image).mean()))
  assert np.mean(contrast != _blend_exact(mean_target, image)[0]) > 0.5


def _smoothed_sums(image):
  """Integer 3x3 sums with weights 1 (ring) and 5 (centre), inner pixels."""
  x = image.astype(np.int64)
  h, w = x.shape[:2]
  sums = np.zeros((h - 2, w - 2, x.shape[2]), np.int64)
  for dy in range(3):
    for dx in range(3):
      weight = 5 if (dy, dx) == (1, 1) else 1
      sums += weight * x[dy:dy + h - 2, dx:dx + w - 2]
  return sums


def test_sharpness_formula_and_pil():
  image = _noise((10, 9, 3))
  out = _both('Sharpness', image)
  # The reference: degenerate = trunc(sum / 13) inside, the image on the
  # border; then blend with factor 2.8, truncated. Computed in integers,
  # allowing only the float rounding a CPU may differ in (see _truncations).
  smooth_floor, smooth_low = _truncations(_smoothed_sums(image), 13)
  allowed = []
  for smooth in (smooth_floor, smooth_low):
    degenerate = image.astype(np.int64)
    degenerate[1:-1, 1:-1] = np.where(smooth >= 0, smooth,
                                      degenerate[1:-1, 1:-1])
    allowed.extend(_blend_exact(degenerate, image))
  _assert_one_of(out, *allowed)
  # The border is never smoothed: there the blend gives the image back.
  border = np.ones(image.shape[:2], bool)
  border[1:-1, 1:-1] = False
  np.testing.assert_array_equal(out[border], image[border])
  # What a wrong op gives is far outside that allowance: the plain box
  # kernel (centre weight 1) or factor 1.8 change most inner pixels.
  box = np.floor(_smoothed_sums(image) - 4 * image[1:-1, 1:-1].astype(
      np.int64)) // 9
  wrong_kernel = image.astype(np.int64)
  wrong_kernel[1:-1, 1:-1] = box
  assert np.mean(_blend_exact(wrong_kernel, image)[0][1:-1, 1:-1] !=
                 out[1:-1, 1:-1]) > 0.5
  degenerate = image.astype(np.int64)
  degenerate[1:-1, 1:-1] = smooth_floor
  assert np.mean(_blend(degenerate, image, 1.8) != out) > 0.3
  pil = np.asarray(ImageEnhance.Sharpness(_pil(image)).enhance(2.8))
  assert np.mean(np.abs(out.astype(int) - pil) <= 3) > 0.9


def _nearest_warp(image, src_x, src_y, half=0.5):
  """Output[y, x] = image[round(src_y), round(src_x)] or 128 outside.

  Ties (a source point exactly between two pixels, e.g. 0.45 * 10) round
  away from zero with half=0.5; half just below 0.5 rounds them towards
  zero, which is what a kernel computing the point with an FMA gives.
  """
  h, w = image.shape[:2]
  rx = (np.sign(src_x) * np.floor(np.abs(src_x) + half)).astype(int)
  ry = (np.sign(src_y) * np.floor(np.abs(src_y) + half)).astype(int)
  inside = (rx >= 0) & (rx < w) & (ry >= 0) & (ry < h)
  out = np.full_like(image, 128)
  out[inside] = image[ry[inside], rx[inside]]
  return out


def test_shear_and_translate_formulas():
  image = _noise((14, 18, 3))
  y, x = np.mgrid[0:14, 0:18].astype(np.float64)
  for negate, sign in ((False, 1), (True, -1)):
    for name, src in (('ShearX', (x + sign * 0.45 * y, y)),
                      ('ShearY', (x, y + sign * 0.45 * x))):
      out = _both(name, image, negate=negate)
      # Either rounding of an exact tie is the reference on some CPU.
      _assert_one_of(out, _nearest_warp(image, *src),
                     _nearest_warp(image, *src, half=0.5 - 1e-9))
      assert np.mean(np.all(out == _nearest_warp(image, *src), -1)) > 0.9
  # Magnitude 15: 150 pixels, the content moves left (or right if negated).
  wide = _noise((3, 170, 3))
  expected = np.full_like(wide, 128)
  expected[:, :20] = wide[:, 150:]
  np.testing.assert_array_equal(_both('TranslateX', wide), expected)
  expected = np.full_like(wide, 128)
  expected[:, 150:] = wide[:, :20]
  np.testing.assert_array_equal(_both('TranslateX', wide, negate=True),
                                expected)
  tall = np.transpose(wide, (1, 0, 2))
  expected = np.full_like(tall, 128)
  expected[:20] = tall[150:]
  np.testing.assert_array_equal(_both('TranslateY', tall), expected)


def test_translate_whole_and_fractional_pixels_match_nearest_resampling():
  # Whole pixels are sliced, fractions resampled: both as the reference's
  # nearest-pixel transform (ImageProjectiveTransformV3, grey fill).
  image = _noise((20, 26, 3))
  for pixels in (0.0, 3.0, -7.0, 19.0, -26.0, 40.0, 2.5, -3.4, 0.6):
    for name, matrix in (
        ('x', [1., 0., pixels, 0., 1., 0., 0., 0.]),
        ('y', [1., 0., 0., 0., 1., pixels, 0., 0.])):
      op = ra.translate_x if name == 'x' else ra.translate_y
      resampled = tf.raw_ops.ImageProjectiveTransformV3(
          images=tf.constant(image)[None], transforms=tf.constant([matrix]),
          output_shape=image.shape[:2], fill_value=128.0,
          interpolation='NEAREST', fill_mode='CONSTANT')[0]
      np.testing.assert_array_equal(op(tf.constant(image), pixels),
                                    resampled, err_msg=f'{name} {pixels}')


def _agreement(a, b):
  return np.mean(np.all(a == b, axis=-1))


def test_rotate_is_exactly_45_degrees_with_a_random_sign():
  image = _blocks()
  plus = _both('Rotate', image)
  minus = _both('Rotate', image, negate=True)
  ref = {angle: ndimage.rotate(image, angle, reshape=False, order=0,
                               mode='grid-constant', cval=128)
         for angle in (-50, -45, -40, 40, 45, 50)}
  # One sign is scipy's +45 degrees, the other its -45, nearly pixel-exact
  # (nearest-pixel ties may round differently); 40 or 50 degrees fit worse.
  best = max((45, -45), key=lambda a: _agreement(plus, ref[a]))
  assert _agreement(plus, ref[best]) > 0.97
  assert _agreement(minus, ref[-best]) > 0.97
  for wrong in (40, 50):
    assert _agreement(plus, ref[np.sign(best) * wrong]) < 0.9
  # Level 5 is 15 degrees (level / 10 * 30).
  fifteen = _both('Rotate', image, magnitude=5)
  ref15 = ndimage.rotate(image, np.sign(best) * 15, reshape=False, order=0,
                         mode='grid-constant', cval=128)
  assert _agreement(fifteen, ref15) > 0.97


def test_cutout_greys_a_clipped_square_around_the_centre():
  image = _noise((100, 90, 3), high=100)  # No 128 in the image.
  for center in ((50, 45), (10, 80), (0, 0)):
    out = _both('Cutout', image, cutout_center=tf.constant(center))
    rows, cols = np.mgrid[0:100, 0:90]
    inside = ((rows >= center[0] - 60) & (rows < center[0] + 60) &
              (cols >= center[1] - 60) & (cols < center[1] + 60))
    np.testing.assert_array_equal(out[inside], 128)
    np.testing.assert_array_equal(out[~inside], image[~inside])


def _replay(image, draws, magnitude):
  """Applies the drawn ops one by one with apply_op."""
  out = tf.constant(image)
  for layer, index in enumerate(draws['ops'].numpy()):
    out = ra.apply_op(out, ra.OPS[index], magnitude,
                      negate=draws['negate'][layer],
                      cutout_center=draws['cutout_center'][layer])
  return out.numpy()


def test_randaugment_applies_exactly_two_chosen_ops():
  image = _blocks(24, 3)
  augment = ra.RandAugment(2, 15)
  counts = collections.Counter()
  for i in range(12):
    seed = tf.constant([i, 3], tf.int64)
    out = augment(tf.constant(image), seed)
    draws = ra.layer_draws(seed, 2, tf.shape(image))
    assert draws['ops'].shape == (2,)
    np.testing.assert_array_equal(out, _replay(image, draws, 15))
  for i in range(1600):
    counts.update(ra.layer_draws(tf.constant([i, 9]), 2,
                                 tf.constant([8, 8]))['ops'].numpy().tolist())
  assert set(counts) == set(range(16))
  assert all(150 < c < 250 for c in counts.values())  # 200 expected.


def test_randaugment_is_deterministic_per_seed_in_parallel_maps():
  image = tf.constant(_blocks(16, 2))
  augment = ra.RandAugment(2, 15)
  first = augment(image, tf.constant([5, 5], tf.int64)).numpy()
  np.testing.assert_array_equal(
      augment(image, tf.constant([5, 5], tf.int64)), first)
  ds = tf.data.Dataset.range(8).map(
      lambda i: augment(image, tf.stack([i, i])), num_parallel_calls=4)
  for i, out in enumerate(ds.as_numpy_iterator()):
    np.testing.assert_array_equal(
        out, augment(image, tf.constant([i, i], tf.int64)))
  changed = [not np.array_equal(augment(image, tf.constant([i, 1])), image)
             for i in range(12)]
  assert sum(changed) >= 8

