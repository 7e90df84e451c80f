"""Tests for mixer_jax.weights.official_format.load_npz on damaged or odd files."""

import numpy as np
import pytest

from mixer_jax.weights import official_format

PretrainedError = official_format.PretrainedError


def test_non_finite_weights_are_refused_naming_the_leaves(tmp_path):
  path = str(tmp_path / 'bad.npz')
  kernel = np.ones((4, 3), np.float32)
  kernel[1, 2] = np.nan
  bias = np.array([0.0, np.inf, -np.inf], np.float32)
  np.savez(path, **{'stem/kernel': kernel, 'head/bias': bias,
                    'head/kernel': np.ones((3, 3), np.float32)})
  with pytest.raises(PretrainedError) as error:
    official_format.load_npz(path)
  message = str(error.value)
  assert 'NaN or infinite' in message and path in message
  assert 'stem/kernel (1 of 12 values)' in message
  assert 'head/bias (2 of 3 values)' in message
  assert 'head/kernel' not in message
  np.savez(path, **{'stem/kernel': np.ones((4, 3), np.float32)})
  assert set(official_format.load_npz(path)) == {'stem/kernel'}


def test_npz_without_arrays_is_a_clear_error(tmp_path):
  path = str(tmp_path / 'empty.npz')
  np.savez(path)
  with pytest.raises(PretrainedError, match='empty .npz archive: it holds no '
                     'arrays'):
    official_format.load_npz(path)


def test_tiny_non_zip_file_is_a_clear_error(tmp_path):
  path = tmp_path / 'short.npz'
  path.write_bytes(b'PK')
  with pytest.raises(PretrainedError, match='short.npz'):
    official_format.load_npz(str(path))
