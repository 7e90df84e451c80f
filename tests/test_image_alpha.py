"""An image's alpha channel is dropped on decode, and `predict` says so."""

import numpy as np
import pytest
import tensorflow as tf

from mixer_jax.data import preprocess


@pytest.mark.parametrize('channels, alpha', [(1, False), (2, True),
                                             (3, False), (4, True)])
def test_png_alpha_is_read_from_the_header(channels, alpha):
  pixels = np.arange(5 * 6 * channels, dtype=np.uint8).reshape(5, 6, channels)
  encoded = tf.io.encode_png(pixels).numpy()  # TensorFlow's own encoder.
  assert preprocess.png_has_alpha(encoded) is alpha
  decoded = preprocess.decode(tf.constant(encoded)).numpy()
  assert decoded.shape == (5, 6, 3)  # What "dropped" means: RGB is kept.
  if channels >= 3:
    np.testing.assert_array_equal(decoded, pixels[..., :3])


def test_other_formats_and_short_data_have_no_alpha():
  jpeg = tf.io.encode_jpeg(np.zeros((4, 4, 3), np.uint8)).numpy()
  assert not preprocess.png_has_alpha(jpeg)
  assert not preprocess.png_has_alpha(b'\x89PNG\r\n\x1a\n')
  assert not preprocess.png_has_alpha(b'')
