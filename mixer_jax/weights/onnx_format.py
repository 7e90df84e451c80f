"""ONNX export of a Mixer: `to_onnx(model, params, image_size)`.

The graph is written with the `onnx` package's own builders (opset 20:
`LayerNormalization`, `Gelu` with its `approximate` attribute), one node per
layer of `models.MlpMixer`, with the parameters as initializers and a
symbolic batch axis. Input `images`: float32 (batch, H, W, 3) scaled to
[-1, 1], as every model here takes; output `logits`: float32 (batch,
classes), or the pooled features for a model without head.

Why not a converter: jax2onnx 0.17 pins orbax-checkpoint below 0.11.37 (this
package needs 0.12.8 or newer), and tf2onnx cannot read what jax2tf writes
now (one `XlaCallModule` op holding StableHLO; JAX's graph serialization is
deprecated and no longer used). The Mixer is ten kinds of plain ops, so
the graph is short and each node is checked by onnxruntime in the tests.
`pip install -e '.[onnx]'` brings onnx and onnxruntime.
"""

from typing import Any, List, Mapping

import numpy as np

from mixer_jax import models
from mixer_jax.weights import official_format

OPSET = 20  # Gelu (approximate='tanh' | 'none') entered the standard at 20.
_LAYER_NORM_EPSILON = 1e-6  # As models.MixerBlock and the official model.


class _Graph:
  """Collects nodes and initializers; names each value once."""

  def __init__(self):
    from onnx import helper  # pylint: disable=g-import-not-at-top
    from onnx import numpy_helper  # pylint: disable=g-import-not-at-top
    self._helper, self._numpy = helper, numpy_helper
    self.nodes: List[Any] = []
    self.initializers: List[Any] = []
    self._count = 0

  def const(self, name: str, value) -> str:
    self.initializers.append(self._numpy.from_array(np.asarray(value), name))
    return name

  def op(self, op_type: str, inputs, **attributes) -> str:
    self._count += 1
    out = f'{op_type.lower()}_{self._count}'
    self.nodes.append(self._helper.make_node(op_type, list(inputs), [out],
                                             **attributes))
    return out

  def dense(self, x: str, params: Mapping[str, Any], name: str) -> str:
    kernel = self.const(f'{name}/kernel', np.asarray(params['kernel'],
                                                     np.float32))
    bias = self.const(f'{name}/bias', np.asarray(params['bias'], np.float32))
    return self.op('Add', [self.op('MatMul', [x, kernel]), bias])

  def layer_norm(self, x: str, params: Mapping[str, Any], name: str) -> str:
    scale = self.const(f'{name}/scale', np.asarray(params['scale'],
                                                   np.float32))
    bias = self.const(f'{name}/bias', np.asarray(params['bias'], np.float32))
    return self.op('LayerNormalization', [x, scale, bias], axis=-1,
                   epsilon=_LAYER_NORM_EPSILON)


def to_onnx(model: models.MlpMixer, params, image_size: int):
  """The model as an `onnx.ModelProto` (checked with onnx.checker).

  Args:
    model: the Mixer (its patch size, GELU form and head).
    params: its parameter tree (official layout).
    image_size: side of the square input.
  """
  import onnx  # pylint: disable=g-import-not-at-top
  from onnx import helper  # pylint: disable=g-import-not-at-top
  params = official_format.unwrap(params)
  gelu = 'tanh' if model.gelu_approximate else 'none'
  g = _Graph()
  # NHWC -> NCHW for Conv; the stem kernel HWIO -> OIHW.
  x = g.op('Transpose', ['images'], perm=[0, 3, 1, 2])
  kernel = np.transpose(np.asarray(params['stem']['kernel'], np.float32),
                        (3, 2, 0, 1))
  patch = model.patch_size
  x = g.op('Conv', [x, g.const('stem/kernel', kernel),
                    g.const('stem/bias', np.asarray(params['stem']['bias'],
                                                    np.float32))],
           kernel_shape=[patch, patch], strides=[patch, patch])
  # (N, C, h, w) -> (N, C, S) -> (N, S, C): tokens in row-major patch order,
  # as the Flax model's reshape of its NHWC stem output.
  x = g.op('Reshape', [x, g.const('shape/tokens', np.array(
      [0, model.hidden_dim, -1], np.int64))])
  x = g.op('Transpose', [x], perm=[0, 2, 1])
  for i in range(model.num_blocks):
    block = params[f'MixerBlock_{i}']
    name = f'MixerBlock_{i}'
    y = g.layer_norm(x, block['LayerNorm_0'], f'{name}/LayerNorm_0')
    y = g.op('Transpose', [y], perm=[0, 2, 1])  # Mix along the tokens.
    y = g.dense(y, block['token_mixing']['Dense_0'],
                f'{name}/token_mixing/Dense_0')
    y = g.dense(g.op('Gelu', [y], approximate=gelu),
                block['token_mixing']['Dense_1'],
                f'{name}/token_mixing/Dense_1')
    x = g.op('Add', [x, g.op('Transpose', [y], perm=[0, 2, 1])])
    y = g.layer_norm(x, block['LayerNorm_1'], f'{name}/LayerNorm_1')
    y = g.dense(y, block['channel_mixing']['Dense_0'],
                f'{name}/channel_mixing/Dense_0')
    y = g.dense(g.op('Gelu', [y], approximate=gelu),
                block['channel_mixing']['Dense_1'],
                f'{name}/channel_mixing/Dense_1')
    x = g.op('Add', [x, y])
  x = g.layer_norm(x, params['pre_head_layer_norm'], 'pre_head_layer_norm')
  x = g.op('ReduceMean', [x, g.const('axes/tokens', np.array([1], np.int64))],
           keepdims=0)
  classes = model.num_classes
  if classes:
    x = g.dense(x, params['head'], 'head')
  g.nodes.append(helper.make_node('Identity', [x], ['logits']))
  width = classes or model.hidden_dim
  graph = helper.make_graph(
      g.nodes, 'mlp_mixer',
      [helper.make_tensor_value_info('images', onnx.TensorProto.FLOAT,
                                     ['batch', image_size, image_size, 3])],
      [helper.make_tensor_value_info('logits', onnx.TensorProto.FLOAT,
                                     ['batch', width])],
      initializer=g.initializers)
  proto = helper.make_model(graph, producer_name='mixer_jax',
                            opset_imports=[helper.make_opsetid('', OPSET)])
  onnx.checker.check_model(proto)
  return proto


def save_onnx(model: models.MlpMixer, params, image_size: int,
              path: str) -> str:
  """Writes `to_onnx(...)` to `path` (one file, weights inside)."""
  import onnx  # pylint: disable=g-import-not-at-top
  onnx.save_model(to_onnx(model, params, image_size), path)
  return path
