"""Our timm-format weights against real timm (PyTorch), where it is installed.

The other timm tests compare with a NumPy transcription of timm's MlpMixer;
these build timm's own module, so a shared misreading of timm's layout (a
transposed kernel, the token/channel names swapped, the LayerNorm epsilon,
the pooling) fails here. They run where `torch` and `timm` are installed
(`pip install -e '.[timm]'`), timm in a child process (`timm_process`).
"""

import json
import os
import re
import subprocess
import sys

from flax import traverse_util
import mixer_reference as ref
import numpy as np
import pytest
from safetensors import numpy as st_numpy
import timm_process

from mixer_jax import models
from mixer_jax.weights import pretrained
from mixer_jax.weights import timm_format

pytestmark = timm_process.needs_timm

# A small Mixer: 16x16 images, patch 4 (16 tokens), 2 blocks, width 32,
# token MLP 16 (ratio 0.5), channel MLP 64 (ratio 2), 10 classes.
SIZES = dict(num_blocks=2, hidden_dim=32, tokens_mlp_dim=16,
             channels_mlp_dim=64)
TIMM_MODEL = """
from timm.models.mlp_mixer import MlpMixer
model = MlpMixer(num_classes=10, img_size=16, patch_size=4, num_blocks=2,
                 embed_dim=32, mlp_ratio=(0.5, 2.0)).eval()
def logits(images_nhwc):
  with torch.no_grad():
    x = torch.from_numpy(np.ascontiguousarray(
        images_nhwc.astype(np.float32).transpose(0, 3, 1, 2)))
    return model(x).numpy()
"""


def _ours(gelu_approximate=False):
  return models.create_model('S_4', 10, gelu_approximate=gelu_approximate,
                             **SIZES)


def test_our_export_loads_strictly_into_timm_and_agrees():
  params = traverse_util.unflatten_dict(ref.official_checkpoint(1, image=16),
                                        sep='/')
  state = timm_format.to_timm_state_dict(params)
  x = ref.images(3, 2, 16)
  out = timm_process.run(TIMM_MODEL + """
state = {k[6:]: torch.from_numpy(v) for k, v in inputs.items()
         if k.startswith('state.')}
model.load_state_dict(state, strict=True)
outputs['logits'] = logits(inputs['images'])
""", images=x, **{f'state.{k}': v for k, v in state.items()})
  np.testing.assert_allclose(out['logits'],
                             _ours().apply({'params': params}, x),
                             rtol=1e-4, atol=1e-4)


def test_timm_weights_import_into_ours_and_agree(tmp_path, monkeypatch):
  x = ref.images(2, 3, 16)
  pixels = np.random.RandomState(0).randint(0, 256, (2, 16, 16, 3))
  mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
  out = timm_process.run(TIMM_MODEL + """
torch.manual_seed(3)
with torch.no_grad():  # timm zero-initialises the head; give it weights.
  model.head.weight.normal_(std=0.5)
  model.head.bias.normal_(std=0.5)
for k, v in model.state_dict().items():
  outputs['state.' + k] = v.numpy()
outputs['logits'] = logits(inputs['images'])
outputs['normalised'] = logits(inputs['normalised'])
""", images=x, normalised=(pixels / 255.0 - np.array(mean)) / np.array(std))
  state = {k[6:]: v for k, v in out.items() if k.startswith('state.')}
  assert np.abs(out['logits']).max() > 0.1  # Not a degenerate output.
  path = str(tmp_path / 'timm.safetensors')
  st_numpy.save_file(state, path)
  params = traverse_util.unflatten_dict(pretrained.read_weights(path).flat,
                                        sep='/')
  np.testing.assert_allclose(_ours().apply({'params': params}, x),
                             out['logits'], rtol=1e-4, atol=1e-4)
  # timm's GELU is the exact (erf) form: the tanh form is measurably off.
  tanh = _ours(gelu_approximate=True).apply({'params': params}, x)
  assert np.abs(tanh - out['logits']).max() > 1e-5

  # The same weights as a Hub snapshot with ImageNet mean/std, via hf-hub:
  # our loader folds the normalisation into the stem for [-1, 1] inputs.
  import test_hub  # pylint: disable=g-import-not-at-top
  from huggingface_hub import constants  # pylint: disable=g-import-not-at-top
  cache = tmp_path / 'hub'
  cache.mkdir()
  monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
  monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
  config = {'architecture': 'mixer_s16_224', 'num_classes': 10,
            'pretrained_cfg': {'tag': 'in1k', 'input_size': [3, 16, 16],
                               'mean': mean, 'std': std, 'num_classes': 10}}
  st_numpy.save_file(state, path, metadata={'format': 'pt'})
  test_hub.write_cached_repo(cache, 'someone/tiny_mixer', {
      'model.safetensors': open(path, 'rb').read(),
      'config.json': json.dumps(config).encode()})
  model, params = pretrained.load_pretrained('hf-hub:someone/tiny_mixer')
  assert not model.gelu_approximate
  np.testing.assert_allclose(
      model.apply({'params': params}, (pixels - 127.5) / 127.5),
      out['normalised'], rtol=1e-4, atol=1e-4)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_the_readme_comparison_with_timm_runs():
  # The README's `tools/compare_timm.py --breakdown`, one round: both
  # libraries time B/16 in both modes, and the ratio is theirs over ours.
  # (Figures are not checked: they belong to the machine.)
  out = subprocess.run(
      [sys.executable, os.path.join(REPO, 'tools', 'compare_timm.py'),
       '--rounds=1', '--breakdown'], capture_output=True, text=True,
      cwd=REPO, timeout=900, check=True).stdout
  rows = re.findall(r'B/16 (infer|train) +batch +(\d+) f32: mixer_jax '
                    r'([\d.]+) img/s, timm ([\d.]+) img/s', out)
  assert [(m, int(b)) for m, b, _, _ in rows] == [('infer', 16),
                                                  ('train', 8)], out
  assert all(float(ours) > 0 and float(timm) > 0 for *_, ours, timm in rows)
  assert len(re.findall(r'forward matmuls alone, batch (16|8) \((\d+) '
                        r'GFLOP\)', out)) == 2, out
