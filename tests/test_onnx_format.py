"""Tests for mixer_jax.weights.onnx_format: the ONNX graph run by onnxruntime.

The expected outputs are the Flax model's own (an independent
implementation of the same layers), for a symbolic batch of 1 and 3, both
GELU forms, with and without head.
"""

from flax import traverse_util
import mixer_reference as ref
import numpy as np
import pytest

from mixer_jax import models
from mixer_jax.weights import onnx_format

ort = pytest.importorskip('onnxruntime')

SIZES = dict(num_blocks=2, hidden_dim=32, tokens_mlp_dim=16,
             channels_mlp_dim=64)


def _session(proto):
  return ort.InferenceSession(proto.SerializeToString(),
                              providers=['CPUExecutionProvider'])


@pytest.mark.parametrize('gelu_approximate', [True, False])
def test_onnx_logits_equal_the_models_for_any_batch(tmp_path,
                                                    gelu_approximate):
  # 24x24 images and patch 4: 36 tokens, so a transposed token MLP or a
  # column-major token order cannot go unnoticed.
  params = traverse_util.unflatten_dict(
      ref.official_checkpoint(2, image=24), sep='/')
  model = models.create_model('S_4', 10, gelu_approximate=gelu_approximate,
                              **SIZES)
  path = onnx_format.save_onnx(model, params, 24, str(tmp_path / 'm.onnx'))
  session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
  for batch in (1, 3):
    x = ref.images(batch, batch, 24)
    (logits,) = session.run(['logits'], {'images': x})
    assert logits.shape == (batch, 10)
    np.testing.assert_allclose(logits, model.apply({'params': params}, x),
                               rtol=1e-4, atol=1e-4)
  # The GELU form is part of the graph: the other form gives other logits.
  other = model.clone(gelu_approximate=not gelu_approximate)
  x = ref.images(9, 3, 24)
  (logits,) = session.run(['logits'], {'images': x})
  assert np.abs(logits - other.apply({'params': params}, x)).max() > 1e-5


def test_model_without_head_gives_the_pooled_features():
  flat = ref.official_checkpoint(4, image=16, classes=0)
  params = traverse_util.unflatten_dict(flat, sep='/')
  model = models.create_model('S_4', None, **SIZES)
  session = _session(onnx_format.to_onnx(model, params, 16))
  x = ref.images(5, 2, 16)
  (features,) = session.run(['logits'], {'images': x})
  assert features.shape == (2, 32)
  np.testing.assert_allclose(features, model.apply({'params': params}, x),
                             rtol=1e-4, atol=1e-4)


def test_wrong_image_size_is_refused_by_the_runtime():
  params = traverse_util.unflatten_dict(ref.official_checkpoint(1), sep='/')
  model = models.create_model('S_4', 10, **SIZES)
  session = _session(onnx_format.to_onnx(model, params, 16))
  with pytest.raises(Exception, match='images'):
    session.run(['logits'], {'images': ref.images(0, 1, 20)})
