"""timm's (PyTorch) MLP-Mixer state dict <-> our parameter tree, as
safetensors through `safetensors.numpy` (neither torch nor timm needed)."""

import os
import re
from typing import Any, Dict, Mapping, Union

from flax import traverse_util
import numpy as np

from mixer_jax.weights import official_format

_BLOCK_MODULES = {
    'LayerNorm_0': 'norm1', 'token_mixing/Dense_0': 'mlp_tokens.fc1',
    'token_mixing/Dense_1': 'mlp_tokens.fc2', 'LayerNorm_1': 'norm2',
    'channel_mixing/Dense_0': 'mlp_channels.fc1',
    'channel_mixing/Dense_1': 'mlp_channels.fc2'}


def _key_map(num_blocks: int) -> Dict[str, str]:
  """Our leaf path ('stem/kernel') -> timm's key ('stem.proj.weight')."""
  modules = {'stem': 'stem.proj', 'pre_head_layer_norm': 'norm',
             'head': 'head'}
  for i in range(num_blocks):
    modules.update({f'MixerBlock_{i}/{ours}': f'blocks.{i}.{theirs}'
                    for ours, theirs in _BLOCK_MODULES.items()})
  keys = {}
  for ours, theirs in modules.items():
    weight = 'scale' if 'LayerNorm' in ours or ours.endswith('norm') else (
        'kernel')
    keys[f'{ours}/{weight}'] = f'{theirs}.weight'
    keys[f'{ours}/bias'] = f'{theirs}.bias'
  return keys


def _num_blocks(keys, pattern) -> int:
  return 1 + max((int(m.group(1)) for m in map(re.compile(pattern).match, keys)
                  if m), default=-1)


def _relayout(key: str, value, to_timm: bool) -> np.ndarray:
  value = np.asarray(value, np.float32)
  if key == 'stem/kernel':  # HWIO <-> OIHW.
    return value.transpose((3, 2, 0, 1) if to_timm else (2, 3, 1, 0))
  # Dense (in, out) <-> Linear (out, in).
  return value.T if key.endswith('/kernel') else value


def to_timm_state_dict(params: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """Our parameter tree -> timm's MlpMixer state dict (NumPy)."""
  flat = traverse_util.flatten_dict(official_format.unwrap(params), sep='/')
  keys = _key_map(_num_blocks(flat, r'^MixerBlock_(\d+)/'))
  unknown = sorted(set(flat) - set(keys))
  if unknown:
    raise ValueError(f'Parameters with no timm MlpMixer counterpart: '
                     f'{unknown}. Only the official Mixer tree can be '
                     f'exported.')
  return {keys[k]: np.ascontiguousarray(_relayout(k, v, True))
          for k, v in flat.items()}


def from_timm_state_dict(state: Mapping[str, Any]) -> Dict[str, Any]:
  """timm's MlpMixer state dict (NumPy arrays) -> our parameter tree."""
  ours = {theirs: k for k, theirs in _key_map(
      _num_blocks(state, r'^blocks\.(\d+)\.')).items()}
  unknown = sorted(set(state) - set(ours))
  if unknown:
    raise ValueError(
        f'Keys that are not part of timm\'s MlpMixer: {unknown}. '
        f'(Checkpoints of timm\'s ResMLP/gMLP models, or with a stem norm, '
        f'are other architectures.)')
  return traverse_util.unflatten_dict(
      {ours[k]: np.ascontiguousarray(_relayout(ours[k], v, False))
       for k, v in state.items()}, sep='/')


def export_timm(params: Mapping[str, Any],
                path: Union[str, os.PathLike]) -> None:
  """Writes `params` as a timm `.safetensors` file."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  data = safetensors.numpy.save(
      to_timm_state_dict(params),
      metadata={'format': 'pt', 'source': 'mixer_jax'})
  with open(path, 'wb') as f:  # save_file would make it 0600 (owner only).
    f.write(data)
