"""Export to and import from timm's (PyTorch) MLP-Mixer state dict.

The files are safetensors written and read with `safetensors.numpy`, so
neither torch nor timm is needed here. Key names and layouts follow timm's
`timm.models.mlp_mixer.MlpMixer`:

| mixer_jax (Flax)                            | timm                              |
|---------------------------------------------|-----------------------------------|
| stem/kernel (P, P, 3, C)                    | stem.proj.weight (C, 3, P, P)     |
| stem/bias (C,)                              | stem.proj.bias                    |
| MixerBlock_i/LayerNorm_0/{scale,bias}       | blocks.i.norm1.{weight,bias}      |
| MixerBlock_i/token_mixing/Dense_0/kernel    | blocks.i.mlp_tokens.fc1.weight    |
|   (S, D_S), transposed to (D_S, S)          |                                   |
| MixerBlock_i/token_mixing/Dense_1           | blocks.i.mlp_tokens.fc2           |
| MixerBlock_i/LayerNorm_1/{scale,bias}       | blocks.i.norm2.{weight,bias}      |
| MixerBlock_i/channel_mixing/Dense_{0,1}     | blocks.i.mlp_channels.fc{1,2}     |
| pre_head_layer_norm/{scale,bias}            | norm.{weight,bias}                |
| head/kernel (C, classes) -> (classes, C)    | head.weight, head.bias            |

Flax Dense kernels are (in, out); torch Linear weights are (out, in), hence
the transposes. The stem goes from HWIO to torch's OIHW conv layout.

GELU: the official weights were trained with the tanh approximation of GELU
(Flax's `nn.gelu` default), while timm's Mixer uses PyTorch's exact (erf)
`nn.GELU`. The weights transfer exactly, but outputs differ slightly (the
two forms differ by up to about 5e-4 per activation). To reproduce the
official outputs in timm, build the model with a tanh GELU, e.g.
`timm.create_model('mixer_b16_224', act_layer=functools.partial(
torch.nn.GELU, approximate='tanh'))`. Conversely, weights trained in PyTorch
with exact GELU should be run here with `create_model(...,
gelu_approximate=False)`. LayerNorm epsilon is 1e-6 on both sides.
"""

import os
import re
from typing import Any, Dict, Mapping, Union

from flax import traverse_util
import numpy as np

from mixer_jax.weights import official_format

# (Flax module path suffix, timm module path suffix) inside a block.
_BLOCK_MODULES = (
    ('LayerNorm_0', 'norm1'),
    ('token_mixing/Dense_0', 'mlp_tokens.fc1'),
    ('token_mixing/Dense_1', 'mlp_tokens.fc2'),
    ('LayerNorm_1', 'norm2'),
    ('channel_mixing/Dense_0', 'mlp_channels.fc1'),
    ('channel_mixing/Dense_1', 'mlp_channels.fc2'),
)
_TOP_MODULES = (('pre_head_layer_norm', 'norm'), ('head', 'head'))
_LEAF_NAMES = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}


def _module_map(num_blocks: int) -> Dict[str, str]:
  """Flax module path -> timm module path for a model of `num_blocks`."""
  mapping = {'stem': 'stem.proj'}
  for i in range(num_blocks):
    for flax_name, timm_name in _BLOCK_MODULES:
      mapping[f'MixerBlock_{i}/{flax_name}'] = f'blocks.{i}.{timm_name}'
  mapping.update(_TOP_MODULES)
  return mapping


def _to_timm_layout(key: str, value: np.ndarray) -> np.ndarray:
  if key == 'stem/kernel':
    return value.transpose(3, 2, 0, 1)  # HWIO -> OIHW.
  if key.endswith('/kernel'):
    return value.T  # Dense (in, out) -> Linear (out, in).
  return value


def _from_timm_layout(key: str, value: np.ndarray) -> np.ndarray:
  if key == 'stem/kernel':
    return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO.
  if key.endswith('/kernel'):
    return value.T
  return value


def _num_blocks(keys, pattern) -> int:
  found = {int(m.group(1)) for m in map(re.compile(pattern).match, keys) if m}
  return max(found) + 1 if found else 0


def to_timm_state_dict(params: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """Maps a mixer_jax parameter tree to timm's MlpMixer state dict (NumPy).

  Raises:
    ValueError: a leaf that has no timm counterpart.
  """
  flat = traverse_util.flatten_dict(official_format.unwrap(params), sep='/')
  modules = _module_map(_num_blocks(flat, r'^MixerBlock_(\d+)/'))
  state, unknown = {}, []
  for key, value in flat.items():
    module, _, leaf = key.rpartition('/')
    if module not in modules or leaf not in _LEAF_NAMES:
      unknown.append(key)
      continue
    array = np.asarray(value, dtype=np.float32)
    state[f'{modules[module]}.{_LEAF_NAMES[leaf]}'] = np.ascontiguousarray(
        _to_timm_layout(key, array))
  if unknown:
    raise ValueError(f'Parameters with no timm MlpMixer counterpart: '
                     f'{sorted(unknown)}. Only the official Mixer tree can be '
                     f'exported.')
  return state


def from_timm_state_dict(state: Mapping[str, Any]) -> Dict[str, Any]:
  """Maps a timm MlpMixer state dict (NumPy arrays) to a parameter tree.

  Raises:
    ValueError: listing keys that are not part of a timm MlpMixer.
  """
  modules = _module_map(_num_blocks(state, r'^blocks\.(\d+)\.'))
  reverse = {timm: flax for flax, timm in modules.items()}
  flat, unknown = {}, []
  for key, value in state.items():
    module, _, leaf = key.rpartition('.')
    if module not in reverse or leaf not in ('weight', 'bias'):
      unknown.append(key)
      continue
    flax_module = reverse[module]
    if leaf == 'bias':
      flax_leaf = 'bias'
    elif flax_module == 'stem' or 'Dense' in flax_module or flax_module == (
        'head'):
      flax_leaf = 'kernel'
    else:
      flax_leaf = 'scale'  # LayerNorm weight.
    flax_key = f'{flax_module}/{flax_leaf}'
    flat[flax_key] = np.ascontiguousarray(
        _from_timm_layout(flax_key, np.asarray(value, dtype=np.float32)))
  if unknown:
    raise ValueError(
        f'Keys that are not part of timm\'s MlpMixer: {sorted(unknown)}. '
        f'(Checkpoints of timm\'s ResMLP/gMLP models, or with a stem norm, '
        f'are other architectures.)')
  return traverse_util.unflatten_dict(flat, sep='/')


def export_timm(params: Mapping[str, Any],
                path: Union[str, os.PathLike]) -> None:
  """Writes `params` as a timm-compatible `.safetensors` file.

  Load it in PyTorch with `model.load_state_dict(
  safetensors.torch.load_file(path))` on a timm MlpMixer of the same size
  (`num_classes` = the head size).
  """
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  data = st_numpy.save(to_timm_state_dict(params),
                       metadata={'format': 'pt', 'source': 'mixer_jax'})
  with open(path, 'wb') as f:  # save_file would make it 0600 (owner only).
    f.write(data)


def import_timm(path: Union[str, os.PathLike]) -> Dict[str, Any]:
  """Reads a timm MlpMixer `.safetensors` file into a parameter tree.

  The tree has the official layout: `pretrained.init_from_checkpoint(tree,
  params)` checks it against a model, and `pretrained.export_official`
  writes it as an official `.npz`.
  """
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  tree = from_timm_state_dict(st_numpy.load_file(os.fspath(path)))
  # NaN/inf weights are refused (PretrainedError naming the leaves).
  official_format.check_finite(traverse_util.flatten_dict(tree, sep='/'),
                               os.fspath(path))
  return tree
