"""Test helpers: official-format checkpoints and a plain NumPy Mixer forward.

Both are written from the paper and the official file format, independently
of `mixer_jax.models`, so tests can check the library against them.
"""

import numpy as np

TINY = dict(patch=4, blocks=2, hidden=32, tokens_mlp=16, channels_mlp=64)


def official_checkpoint(seed=0, *, patch=4, blocks=2, hidden=32, tokens_mlp=16,
                        channels_mlp=64, image=16, classes=10):
  """A flat official-format parameter dict with random non-zero leaves."""
  rng = np.random.RandomState(seed)
  tokens = (image // patch) ** 2

  def dense(fan_in, fan_out):
    return (rng.randn(fan_in, fan_out) / np.sqrt(fan_in)).astype(np.float32)

  def vector(size, center=0.0):
    return (center + 0.1 * rng.randn(size)).astype(np.float32)

  flat = {'stem/kernel': (rng.randn(patch, patch, 3, hidden) /
                          np.sqrt(3 * patch * patch)).astype(np.float32),
          'stem/bias': vector(hidden)}
  for i in range(blocks):
    block = f'MixerBlock_{i}/'
    for norm in ('LayerNorm_0', 'LayerNorm_1'):
      flat[block + norm + '/scale'] = vector(hidden, 1.0)
      flat[block + norm + '/bias'] = vector(hidden)
    for name, width, mlp in (('token_mixing', tokens, tokens_mlp),
                             ('channel_mixing', hidden, channels_mlp)):
      flat[f'{block}{name}/Dense_0/kernel'] = dense(width, mlp)
      flat[f'{block}{name}/Dense_0/bias'] = vector(mlp)
      flat[f'{block}{name}/Dense_1/kernel'] = dense(mlp, width)
      flat[f'{block}{name}/Dense_1/bias'] = vector(width)
  flat['pre_head_layer_norm/scale'] = vector(hidden, 1.0)
  flat['pre_head_layer_norm/bias'] = vector(hidden)
  if classes:
    flat['head/kernel'] = dense(hidden, classes)
    flat['head/bias'] = vector(classes)
  return flat


def gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) *
                                  (x + 0.044715 * x ** 3)))


def layer_norm(x, scale, bias, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def forward(flat, images, head=True):
  """Logits (or pooled features) of official-format params, in float64."""
  flat = {k: np.asarray(v, np.float64) for k, v in flat.items()}
  images = np.asarray(images, np.float64)
  patch = flat['stem/kernel'].shape[0]
  batch, height, width, _ = images.shape
  rows, cols = height // patch, width // patch
  # Row-major patches, each flattened in (dy, dx, channel) order like HWIO.
  x = images.reshape(batch, rows, patch, cols, patch, 3)
  x = x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, rows * cols, -1)
  x = x @ flat['stem/kernel'].reshape(-1, flat['stem/bias'].size)
  x = x + flat['stem/bias']
  i = 0
  while f'MixerBlock_{i}/LayerNorm_0/scale' in flat:
    p = {k.split('/', 1)[1]: v for k, v in flat.items()
         if k.startswith(f'MixerBlock_{i}/')}
    y = layer_norm(x, p['LayerNorm_0/scale'], p['LayerNorm_0/bias'])
    y = y.transpose(0, 2, 1)  # (batch, channels, tokens)
    y = gelu_tanh(y @ p['token_mixing/Dense_0/kernel'] +
                  p['token_mixing/Dense_0/bias'])
    y = y @ p['token_mixing/Dense_1/kernel'] + p['token_mixing/Dense_1/bias']
    x = x + y.transpose(0, 2, 1)
    y = layer_norm(x, p['LayerNorm_1/scale'], p['LayerNorm_1/bias'])
    y = gelu_tanh(y @ p['channel_mixing/Dense_0/kernel'] +
                  p['channel_mixing/Dense_0/bias'])
    x = x + y @ p['channel_mixing/Dense_1/kernel'] + p[
        'channel_mixing/Dense_1/bias']
    i += 1
  x = layer_norm(x, flat['pre_head_layer_norm/scale'],
                 flat['pre_head_layer_norm/bias'])
  features = x.mean(axis=1)
  if not head:
    return features
  return features @ flat['head/kernel'] + flat['head/bias']


def images(seed, batch, size):
  return np.random.RandomState(seed).uniform(
      -1, 1, (batch, size, size, 3)).astype(np.float32)
