"""Our timm-format weights against real timm (PyTorch), where it is installed.

The other timm tests compare with a NumPy transcription of timm's MlpMixer;
these build timm's own module, so a shared misreading of timm's layout (a
transposed kernel, the token/channel names swapped, the LayerNorm epsilon,
the pooling) fails here. They run where `torch` and `timm` import (`pip
install -e '.[timm]'`) and are skipped elsewhere.
"""

import json

from flax import traverse_util
import mixer_reference as ref
import numpy as np
import pytest
from safetensors import numpy as st_numpy

from mixer_jax import models
from mixer_jax.weights import pretrained
from mixer_jax.weights import timm_format

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')
from timm.models import mlp_mixer  # pylint: disable=g-import-not-at-top,wrong-import-position

# A small Mixer: 16x16 images, patch 4 (16 tokens), 2 blocks, width 32,
# token MLP 16 (ratio 0.5), channel MLP 64 (ratio 2), 10 classes.
SIZES = dict(num_blocks=2, hidden_dim=32, tokens_mlp_dim=16,
             channels_mlp_dim=64)


def _timm_model(seed=None):
  if seed is not None:
    torch.manual_seed(seed)
  model = mlp_mixer.MlpMixer(num_classes=10, img_size=16, patch_size=4,
                             num_blocks=2, embed_dim=32, mlp_ratio=(0.5, 2.0))
  return model.eval()


def _timm_logits(model, images_nhwc):
  with torch.no_grad():
    x = torch.from_numpy(np.ascontiguousarray(
        np.asarray(images_nhwc, np.float32).transpose(0, 3, 1, 2)))
    return model(x).numpy()


def _ours(gelu_approximate=False):
  return models.create_model('S_4', 10, gelu_approximate=gelu_approximate,
                             **SIZES)


def test_our_export_loads_strictly_into_timm_and_agrees():
  flat = ref.official_checkpoint(1, image=16)
  params = traverse_util.unflatten_dict(flat, sep='/')
  state = timm_format.to_timm_state_dict(params)
  model = _timm_model()
  model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()},
                        strict=True)
  x = ref.images(3, 2, 16)
  np.testing.assert_allclose(_timm_logits(model, x),
                             _ours().apply({'params': params}, x),
                             rtol=1e-4, atol=1e-4)


def test_timm_weights_import_into_ours_and_agree(tmp_path):
  model = _timm_model(seed=3)
  # timm zero-initialises nothing that matters here except the head: give
  # it weights so the logits depend on every layer.
  with torch.no_grad():
    model.head.weight.normal_(std=0.5)
    model.head.bias.normal_(std=0.5)
  path = str(tmp_path / 'timm.safetensors')
  st_numpy.save_file({k: v.numpy() for k, v in model.state_dict().items()},
                     path)
  params = timm_format.import_timm(path)
  x = ref.images(2, 3, 16)
  expected = _timm_logits(model, x)
  assert np.abs(expected).max() > 0.1  # Not a degenerate all-zero output.
  np.testing.assert_allclose(_ours().apply({'params': params}, x), expected,
                             rtol=1e-4, atol=1e-4)
  # timm's GELU is the exact (erf) form: the tanh form is measurably off.
  tanh = _ours(gelu_approximate=True).apply({'params': params}, x)
  assert np.abs(tanh - expected).max() > 1e-5


def test_hub_folder_with_timm_normalisation_loads_like_timm(
    tmp_path, monkeypatch):
  """A Hub snapshot of a real timm model, ImageNet mean/std, via hf-hub:."""
  import test_hub  # pylint: disable=g-import-not-at-top
  from huggingface_hub import constants  # pylint: disable=g-import-not-at-top
  cache = tmp_path / 'hf_home' / 'hub'
  cache.mkdir(parents=True)
  monkeypatch.setenv('HF_HUB_CACHE', str(cache))
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
  monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
  model = _timm_model(seed=5)
  with torch.no_grad():
    model.head.weight.normal_(std=0.5)
  mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
  config = {'architecture': 'mixer_s16_224', 'num_classes': 10,
            'pretrained_cfg': {'tag': 'in1k', 'input_size': [3, 16, 16],
                               'interpolation': 'bicubic', 'crop_pct': 0.875,
                               'mean': mean, 'std': std, 'num_classes': 10}}
  weights = tmp_path / 'model.safetensors'
  st_numpy.save_file({k: v.numpy() for k, v in model.state_dict().items()},
                     str(weights), metadata={'format': 'pt'})
  test_hub.write_cached_repo(cache, 'someone/tiny_mixer', {
      'model.safetensors': weights.read_bytes(),
      'config.json': json.dumps(config).encode()})
  ours, params = pretrained.load_pretrained('hf-hub:someone/tiny_mixer')
  assert not ours.gelu_approximate
  pixels = np.random.RandomState(0).randint(0, 256, (2, 16, 16, 3))
  # timm's input: x / 255 normalised by mean/std; ours: x in [-1, 1].
  timm_input = (pixels / 255.0 - np.array(mean)) / np.array(std)
  np.testing.assert_allclose(
      ours.apply({'params': params}, (pixels - 127.5) / 127.5),
      _timm_logits(model, timm_input), rtol=1e-4, atol=1e-4)
