"""ONNX export of a Mixer, one node per layer with the `onnx` package's own
builders; docs/export.md ("ONNX") gives the graph's inputs and why."""

from flax import traverse_util
import numpy as np

from mixer_jax import models
from mixer_jax.weights import official_format

OPSET = 20  # Gelu (approximate='tanh' | 'none') entered the standard at 20.
_LAYER_NORM_EPSILON = 1e-6  # As models.MixerBlock and the official model.


def to_onnx(model: models.MlpMixer, params, image_size: int):
  """The model as a checked `onnx.ModelProto` for square `image_size`."""
  import onnx  # pylint: disable=g-import-not-at-top
  from onnx import helper  # pylint: disable=g-import-not-at-top
  from onnx import numpy_helper  # pylint: disable=g-import-not-at-top
  flat = traverse_util.flatten_dict(official_format.unwrap(params), sep='/')
  nodes, initializers = [], []

  def const(name, value=None):
    """An initializer: `value`, or the parameter of that path."""
    value = np.asarray(flat[name] if value is None else value)
    if value.dtype != np.int64:  # Shapes and axes stay int64.
      value = value.astype(np.float32)
    initializers.append(numpy_helper.from_array(value, name))
    return name

  def op(op_type, inputs, **attributes):
    out = f'{op_type.lower()}_{len(nodes) + 1}'
    nodes.append(helper.make_node(op_type, list(inputs), [out], **attributes))
    return out

  def dense(x, name):
    return op('Add', [op('MatMul', [x, const(f'{name}/kernel')]),
                      const(f'{name}/bias')])

  def layer_norm(x, name):
    return op('LayerNormalization', [x, const(f'{name}/scale'),
                                     const(f'{name}/bias')],
              axis=-1, epsilon=_LAYER_NORM_EPSILON)

  def mlp(x, name):
    gelu = 'tanh' if model.gelu_approximate else 'none'
    x = op('Gelu', [dense(x, f'{name}/Dense_0')], approximate=gelu)
    return dense(x, f'{name}/Dense_1')

  patch = model.patch_size
  x = op('Transpose', ['images'], perm=[0, 3, 1, 2])  # NHWC -> NCHW.
  kernel = np.transpose(flat['stem/kernel'], (3, 2, 0, 1))  # HWIO -> OIHW.
  x = op('Conv', [x, const('stem/kernel', kernel), const('stem/bias')],
         kernel_shape=[patch, patch], strides=[patch, patch])
  # (N, C, h, w) -> (N, C, S) -> (N, S, C): tokens in row-major patch order,
  # as the Flax model's reshape of its NHWC stem output.
  x = op('Reshape', [x, const('shape/tokens', np.array(
      [0, model.hidden_dim, -1], np.int64))])
  x = op('Transpose', [x], perm=[0, 2, 1])
  for i in range(model.num_blocks):
    name = f'MixerBlock_{i}'
    y = op('Transpose', [layer_norm(x, f'{name}/LayerNorm_0')],
           perm=[0, 2, 1])  # Mix along the tokens.
    y = mlp(y, f'{name}/token_mixing')
    x = op('Add', [x, op('Transpose', [y], perm=[0, 2, 1])])
    y = mlp(layer_norm(x, f'{name}/LayerNorm_1'), f'{name}/channel_mixing')
    x = op('Add', [x, y])
  x = layer_norm(x, 'pre_head_layer_norm')
  x = op('ReduceMean', [x, const('axes/tokens', np.array([1], np.int64))],
         keepdims=0)
  if model.num_classes:
    x = dense(x, 'head')
  nodes.append(helper.make_node('Identity', [x], ['logits']))
  graph = helper.make_graph(
      nodes, 'mlp_mixer',
      [helper.make_tensor_value_info('images', onnx.TensorProto.FLOAT,
                                     ['batch', image_size, image_size, 3])],
      [helper.make_tensor_value_info(
          'logits', onnx.TensorProto.FLOAT,
          ['batch', model.num_classes or model.hidden_dim])],
      initializer=initializers)
  proto = helper.make_model(graph, producer_name='mixer_jax',
                            opset_imports=[helper.make_opsetid('', OPSET)])
  onnx.checker.check_model(proto)
  return proto


def save_onnx(model: models.MlpMixer, params, image_size: int,
              path: str) -> str:
  import onnx  # pylint: disable=g-import-not-at-top
  onnx.save_model(to_onnx(model, params, image_size), path)
  return path
