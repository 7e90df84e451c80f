"""timm .safetensors files with NaN/Inf weights are refused when read."""

from flax import traverse_util
import mixer_reference as ref
import numpy as np
import pytest
from safetensors import numpy as st_numpy

from mixer_jax.weights import official_format
from mixer_jax.weights import pretrained
from mixer_jax.weights import timm_format


def test_nonfinite_timm_weights_are_refused_naming_the_leaves(tmp_path):
  params = traverse_util.unflatten_dict(ref.official_checkpoint(0), sep='/')
  path = str(tmp_path / 'mixer.safetensors')
  timm_format.export_timm(params, path)
  state = dict(st_numpy.load_file(path))
  state['head.weight'] = state['head.weight'].copy()
  state['head.weight'][0, :2] = np.nan
  state['blocks.0.norm1.bias'] = np.full_like(state['blocks.0.norm1.bias'],
                                              np.inf)
  st_numpy.save_file(state, path)
  with pytest.raises(official_format.PretrainedError) as e:
    pretrained.read_weights(path)
  message = str(e.value)
  assert path in message
  assert 'head/kernel (2 of' in message
  assert 'MixerBlock_0/LayerNorm_0/bias' in message
