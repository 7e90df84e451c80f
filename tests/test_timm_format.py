"""Tests for mixer_jax.weights.timm_format: timm key names, layouts and round trips.

The expected outputs come from a NumPy forward pass written the way PyTorch
computes timm's MlpMixer (NCHW conv weights (out, in, kh, kw), Linear weights
(out, in) used as x @ W.T + b), so a wrong transpose cannot go unnoticed.
"""

import math

from flax import traverse_util
import mixer_reference as ref
import numpy as np
import pytest
from safetensors import numpy as st_numpy

from mixer_jax import models
from mixer_jax.weights import pretrained
from mixer_jax.weights import timm_format


def _gelu_exact(x):
  erf = np.vectorize(math.erf)
  return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _torch_style_forward(state, images_nhwc, approximate):
  """timm MlpMixer.forward on a NumPy state dict (float64)."""
  s = {k: np.asarray(v, np.float64) for k, v in state.items()}
  act = ref.gelu_tanh if approximate else _gelu_exact
  x = np.asarray(images_nhwc, np.float64).transpose(0, 3, 1, 2)  # NCHW
  weight = s['stem.proj.weight']  # (C, 3, P, P)
  channels, _, patch, _ = weight.shape
  batch, _, height, width = x.shape
  rows, cols = height // patch, width // patch
  # Conv2d with stride = kernel = P, then traverse_util.flatten_dict(2, sep='/').transpose(1, 2).
  p = x.reshape(batch, 3, rows, patch, cols, patch)
  out = np.einsum('bcrpkq,ocpq->bork', p, weight)
  out = out + s['stem.proj.bias'][None, :, None, None]
  tokens = out.reshape(batch, channels, rows * cols).transpose(0, 2, 1)

  def linear(v, name):
    return v @ s[name + '.weight'].T + s[name + '.bias']

  def norm(v, name):
    return ref.layer_norm(v, s[name + '.weight'], s[name + '.bias'])

  i = 0
  while f'blocks.{i}.norm1.weight' in s:
    b = f'blocks.{i}.'
    y = norm(tokens, b + 'norm1').transpose(0, 2, 1)
    y = linear(act(linear(y, b + 'mlp_tokens.fc1')), b + 'mlp_tokens.fc2')
    tokens = tokens + y.transpose(0, 2, 1)
    y = norm(tokens, b + 'norm2')
    tokens = tokens + linear(act(linear(y, b + 'mlp_channels.fc1')),
                             b + 'mlp_channels.fc2')
    i += 1
  return linear(norm(tokens, 'norm').mean(1), 'head')


def _params(seed=0, **sizes):
  return traverse_util.unflatten_dict(ref.official_checkpoint(seed, **sizes),
                                      sep='/')


def test_timm_key_names_and_shapes():
  state = timm_format.to_timm_state_dict(_params(blocks=2, classes=10))
  expected = {'stem.proj.weight': (32, 3, 4, 4), 'stem.proj.bias': (32,),
              'norm.weight': (32,), 'norm.bias': (32,),
              'head.weight': (10, 32), 'head.bias': (10,)}
  for i in range(2):
    b = f'blocks.{i}.'
    expected.update({
        b + 'norm1.weight': (32,), b + 'norm1.bias': (32,),
        b + 'mlp_tokens.fc1.weight': (16, 16), b + 'mlp_tokens.fc1.bias': (16,),
        b + 'mlp_tokens.fc2.weight': (16, 16), b + 'mlp_tokens.fc2.bias': (16,),
        b + 'norm2.weight': (32,), b + 'norm2.bias': (32,),
        b + 'mlp_channels.fc1.weight': (64, 32),
        b + 'mlp_channels.fc1.bias': (64,),
        b + 'mlp_channels.fc2.weight': (32, 64),
        b + 'mlp_channels.fc2.bias': (32,)})
  assert {k: v.shape for k, v in state.items()} == expected
  assert all(v.dtype == np.float32 and v.flags.c_contiguous
             for v in state.values())


def test_tokens_and_channels_layouts_are_distinguished():
  # 36 tokens and D_S 16 make every token-mixing shape unambiguous.
  state = timm_format.to_timm_state_dict(_params(image=24, tokens_mlp=16))
  assert state['blocks.0.mlp_tokens.fc1.weight'].shape == (16, 36)
  assert state['blocks.0.mlp_tokens.fc2.weight'].shape == (36, 16)


@pytest.mark.parametrize('approximate', [True, False])
def test_exported_weights_compute_the_same_function(approximate):
  flat = ref.official_checkpoint(1, image=16)
  state = timm_format.to_timm_state_dict(
      traverse_util.unflatten_dict(flat, sep='/'))
  model = models.create_model('S_4', 10, num_blocks=2, hidden_dim=32,
                              tokens_mlp_dim=16, channels_mlp_dim=64,
                              gelu_approximate=approximate)
  x = ref.images(3, 2, 16)
  ours = model.apply({'params': traverse_util.unflatten_dict(flat, sep='/')}, x)
  np.testing.assert_allclose(_torch_style_forward(state, x, approximate),
                             ours, rtol=1e-4, atol=1e-4)
  if approximate:  # The GELU difference is small but real.
    other = _torch_style_forward(state, x, approximate=False)
    assert 1e-7 < np.abs(other - ours).max() < 1e-2


def test_safetensors_round_trip_is_exact(tmp_path):
  params = _params(2)
  path = str(tmp_path / 'out' / 'mixer.safetensors')
  timm_format.export_timm(params, path)
  on_disk = st_numpy.load_file(path)
  assert 'blocks.1.mlp_channels.fc2.weight' in on_disk
  back = traverse_util.unflatten_dict(pretrained.read_weights(path).flat,
                                      sep='/')
  flat = traverse_util.flatten_dict(params, sep='/')
  back_flat = traverse_util.flatten_dict(back, sep='/')
  assert set(flat) == set(back_flat)
  for key in flat:
    np.testing.assert_array_equal(back_flat[key], flat[key], err_msg=key)
  # The file fills a model's parameters like any checkpoint.
  target = traverse_util.unflatten_dict(
      {k: np.zeros_like(v) for k, v in flat.items()}, sep='/')
  filled = pretrained.init_from_checkpoint(path, target)
  np.testing.assert_array_equal(filled['stem']['kernel'],
                                params['stem']['kernel'])


def test_unknown_keys_are_reported():
  state = timm_format.to_timm_state_dict(_params(3))
  state['blocks.0.ls1'] = np.ones(32, np.float32)  # ResMLP-style layer scale.
  with pytest.raises(ValueError, match="blocks.0.ls1"):
    timm_format.from_timm_state_dict(state)
  params = _params(3)
  params['MixerBlock_0']['extra'] = {'kernel': np.ones((2, 2), np.float32)}
  with pytest.raises(ValueError, match='MixerBlock_0/extra/kernel'):
    timm_format.to_timm_state_dict(params)
