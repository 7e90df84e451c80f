"""Tests for mixer_jax.weights.hub: timm checkpoints from a Hugging Face Hub cache.

No network: each test writes a Hub cache in huggingface_hub's own layout
(`models--OWNER--NAME/{blobs,refs,snapshots}`) under a temporary directory,
with offline mode on, so `hf_hub_download` itself resolves the files from it.
The weights are random tensors in timm's layout, and the expected logits
come from a NumPy forward pass written here in timm's layout and conventions
(OIHW conv, (out, in) Linear weights, raw pixels normalised by the config's
mean/std), independently of mixer_jax's models and name mapping.
"""

import hashlib
import json
import os
import pathlib
import subprocess
import sys

from flax import traverse_util
import mixer_reference as ref
import numpy as np
from PIL import Image
import pytest
from safetensors import numpy as st_numpy
from scipy import special

from mixer_jax.weights import hub
from mixer_jax.weights import official_format
from mixer_jax.weights import pretrained
from mixer_jax.weights import registry
from mixer_jax.weights import timm_format

REPO = pathlib.Path(__file__).resolve().parents[1]
PATCH, BLOCKS, HIDDEN, TOKENS_MLP, CHANNELS_MLP, IMAGE = 4, 2, 24, 12, 48, 16
TOKENS = (IMAGE // PATCH) ** 2
GOOG = 'timm/mixer_t4_16.goog_in21k_ft_in1k'
MIIL = 'timm/mixer_t4_16.miil_in21k_ft_in1k'


def timm_state(seed, classes=7):
  """A random timm MlpMixer state dict (names and layouts as timm's)."""
  rng = np.random.RandomState(seed)

  def linear(name, fan_out, fan_in):
    state[f'{name}.weight'] = (rng.randn(fan_out, fan_in) /
                               np.sqrt(fan_in)).astype(np.float32)
    state[f'{name}.bias'] = (0.1 * rng.randn(fan_out)).astype(np.float32)

  def norm(name):
    state[f'{name}.weight'] = (1 + 0.1 * rng.randn(HIDDEN)).astype(np.float32)
    state[f'{name}.bias'] = (0.1 * rng.randn(HIDDEN)).astype(np.float32)

  state = {'stem.proj.weight': (rng.randn(HIDDEN, 3, PATCH, PATCH) / np.sqrt(
      3 * PATCH * PATCH)).astype(np.float32),
           'stem.proj.bias': (0.1 * rng.randn(HIDDEN)).astype(np.float32)}
  for i in range(BLOCKS):
    norm(f'blocks.{i}.norm1')
    linear(f'blocks.{i}.mlp_tokens.fc1', TOKENS_MLP, TOKENS)
    linear(f'blocks.{i}.mlp_tokens.fc2', TOKENS, TOKENS_MLP)
    norm(f'blocks.{i}.norm2')
    linear(f'blocks.{i}.mlp_channels.fc1', CHANNELS_MLP, HIDDEN)
    linear(f'blocks.{i}.mlp_channels.fc2', HIDDEN, CHANNELS_MLP)
  norm('norm')
  linear('head', classes, HIDDEN)
  return state


def timm_forward(state, pixels, mean, std, exact_gelu):
  """timm's MlpMixer on uint8-valued NHWC pixels, in float64."""
  s = {k: np.asarray(v, np.float64) for k, v in state.items()}
  x = (np.asarray(pixels, np.float64) / 255.0 - np.asarray(mean)) / np.asarray(
      std)
  x = x.transpose(0, 3, 1, 2)  # NCHW, as torch.
  n, c, h, w = x.shape
  x = x.reshape(n, c, h // PATCH, PATCH, w // PATCH, PATCH)
  x = np.einsum('ncypxq,ocpq->nyxo', x, s['stem.proj.weight'])
  x = x.reshape(n, -1, HIDDEN) + s['stem.proj.bias']  # Row-major tokens.

  def gelu(z):
    if exact_gelu:
      return 0.5 * z * (1 + special.erf(z / np.sqrt(2)))
    return ref.gelu_tanh(z)

  def ln(z, name):
    mu = z.mean(-1, keepdims=True)
    var = ((z - mu) ** 2).mean(-1, keepdims=True)
    return (z - mu) / np.sqrt(var + 1e-6) * s[f'{name}.weight'] + s[
        f'{name}.bias']

  def mlp(z, name):
    z = gelu(z @ s[f'{name}.fc1.weight'].T + s[f'{name}.fc1.bias'])
    return z @ s[f'{name}.fc2.weight'].T + s[f'{name}.fc2.bias']

  for i in range(BLOCKS):
    b = f'blocks.{i}'
    x = x + mlp(ln(x, f'{b}.norm1').transpose(0, 2, 1),
                f'{b}.mlp_tokens').transpose(0, 2, 1)
    x = x + mlp(ln(x, f'{b}.norm2'), f'{b}.mlp_channels')
  x = ln(x, 'norm').mean(axis=1)
  return x @ s['head.weight'].T + s['head.bias']


def timm_config(tag, mean, std, classes=7, **extra):
  return {'architecture': 'mixer_t4_16', 'num_classes': classes,
          'num_features': HIDDEN, 'global_pool': 'avg',
          'pretrained_cfg': {
              'tag': tag, 'custom_load': False,
              'input_size': [3, IMAGE, IMAGE], 'fixed_input_size': True,
              'interpolation': 'bicubic', 'crop_pct': 0.875,
              'crop_mode': 'center', 'mean': list(mean), 'std': list(std),
              'num_classes': classes, 'first_conv': 'stem.proj',
              'classifier': 'head', **extra}}


def write_cached_repo(cache, repo_id, files, *, revision='a' * 40,
                      refs=('main',)):
  """Writes `files` ({name: bytes}) as one snapshot in the Hub cache layout.

  The layout of huggingface_hub's cache: content-addressed blobs,
  `snapshots/<commit>/<file>` links to them, `refs/<branch>` holding the
  commit hash.
  """
  root = pathlib.Path(cache) / ('models--' + repo_id.replace('/', '--'))
  (root / 'blobs').mkdir(parents=True, exist_ok=True)
  (root / 'refs').mkdir(exist_ok=True)
  snapshot = root / 'snapshots' / revision
  snapshot.mkdir(parents=True, exist_ok=True)
  for name, data in files.items():
    digest = hashlib.sha256(data).hexdigest()
    (root / 'blobs' / digest).write_bytes(data)
    os.symlink(os.path.join('..', '..', 'blobs', digest), snapshot / name)
  for ref_name in refs:
    (root / 'refs' / ref_name).write_text(revision)
  return revision


def repo_files(tmp_path, state, config):
  weights = tmp_path / f'w{len(list(tmp_path.iterdir()))}.safetensors'
  st_numpy.save_file(state, str(weights), metadata={'format': 'pt'})
  return {'model.safetensors': weights.read_bytes(),
          'config.json': json.dumps(config).encode()}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
  """An empty offline Hub cache: huggingface_hub reads only this directory.

  huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE into its `constants`
  module when first imported, so both the environment (for subprocesses)
  and those public constants (for this process) are set.
  """
  from huggingface_hub import constants  # pylint: disable=g-import-not-at-top
  cache = tmp_path / 'hf_home' / 'hub'
  cache.mkdir(parents=True)
  monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf_home'))
  monkeypatch.setenv('HF_HUB_CACHE', str(cache))
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
  monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
  return cache


def pixels(seed, batch=2):
  return np.random.RandomState(seed).randint(
      0, 256, (batch, IMAGE, IMAGE, 3)).astype(np.float32)


def to_model_input(x):
  """mixer_jax's preprocessing: pixels to [-1, 1]."""
  return (x - 127.5) / 127.5


def test_parse():
  name = hub.parse('hf-hub:timm/mixer_b16_224.goog_in21k_ft_in1k@v1.0')
  assert (name.repo_id, name.revision) == (
      'timm/mixer_b16_224.goog_in21k_ft_in1k', 'v1.0')
  assert hub.parse('hf-hub:timm/x').revision is None
  assert str(hub.parse('hf-hub:a/b@c')) == 'hf-hub:a/b@c'
  for bad in ('hf-hub:timm', 'hf-hub:a/b@', 'timm/x', 'hf-hub:a/b/c'):
    with pytest.raises(ValueError):
      hub.parse(bad)


def test_goog_weights_from_the_cache(tmp_path, hub_cache):
  state = timm_state(0)
  write_cached_repo(hub_cache, GOOG, repo_files(
      tmp_path, state, timm_config('goog_in21k_ft_in1k', [0.5] * 3,
                                   [0.5] * 3)))
  model, params = pretrained.load_pretrained(f'hf-hub:{GOOG}')
  assert (model.patch_size, model.num_blocks, model.hidden_dim,
          model.tokens_mlp_dim, model.channels_mlp_dim, model.num_classes) == (
              PATCH, BLOCKS, HIDDEN, TOKENS_MLP, CHANNELS_MLP, 7)
  assert model.gelu_approximate  # Trained in JAX with tanh GELU.
  x = pixels(1)
  np.testing.assert_allclose(
      model.apply({'params': params}, to_model_input(x)),
      timm_forward(state, x, [0.5] * 3, [0.5] * 3, exact_gelu=False),
      rtol=1e-4, atol=1e-4)
  # The GELU form matters at this tolerance: the exact form gives others.
  exact = timm_forward(state, x, [0.5] * 3, [0.5] * 3, exact_gelu=True)
  assert np.abs(model.apply({'params': params}, to_model_input(x)) -
                exact).max() > 1e-4


def test_miil_normalisation_and_exact_gelu(tmp_path, hub_cache):
  """MIIL weights take x/255 (mean 0, std 1) and were trained with erf GELU."""
  state = timm_state(2)
  mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
  write_cached_repo(hub_cache, MIIL, repo_files(
      tmp_path, state, timm_config('miil_in21k_ft_in1k', mean, std)))
  loaded = pretrained.load_pretrained(f'hf-hub:{MIIL}')
  model, params = loaded
  assert not model.gelu_approximate
  x = pixels(3)
  expected = timm_forward(state, x, mean, std, exact_gelu=True)
  got = model.apply({'params': params}, to_model_input(x))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  # Without folding the normalisation, [-1, 1] inputs would be wrong.
  unfolded = timm_forward(state, to_model_input(x) * 255, mean, std, True)
  assert np.abs(unfolded - expected).max() > 1e-2
  # Per-channel mean/std of any other value are folded exactly too.
  mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
  write_cached_repo(hub_cache, 'someone/mixer_other', repo_files(
      tmp_path, state, timm_config('in1k', mean, std)))
  model, params = pretrained.load_pretrained('hf-hub:someone/mixer_other')
  np.testing.assert_allclose(
      model.apply({'params': params}, to_model_input(x)),
      timm_forward(state, x, mean, std, exact_gelu=True), rtol=1e-4,
      atol=1e-4)


def test_revisions(tmp_path, hub_cache):
  old, new = timm_state(4), timm_state(5)
  cfg = timm_config('goog_in21k', [0.5] * 3, [0.5] * 3)
  old_rev = write_cached_repo(hub_cache, GOOG, repo_files(tmp_path, old, cfg),
                              revision='1' * 40, refs=('v1',))
  write_cached_repo(hub_cache, GOOG, repo_files(tmp_path, new, cfg),
                    revision='2' * 40, refs=('main',))
  x = pixels(6, batch=1)

  def logits(name):
    model, params = pretrained.load_pretrained(name)
    return np.asarray(model.apply({'params': params}, to_model_input(x)))

  want_old = timm_forward(old, x, [0.5] * 3, [0.5] * 3, False)
  want_new = timm_forward(new, x, [0.5] * 3, [0.5] * 3, False)
  np.testing.assert_allclose(logits(f'hf-hub:{GOOG}'), want_new, atol=1e-4)
  np.testing.assert_allclose(logits(f'hf-hub:{GOOG}@v1'), want_old, atol=1e-4)
  np.testing.assert_allclose(logits(f'hf-hub:{GOOG}@{old_rev}'), want_old,
                             atol=1e-4)


def test_not_cached_offline(hub_cache):
  with pytest.raises(registry.CheckpointNotFoundError, match='HF_HUB_OFFLINE'):
    pretrained.load_pretrained('hf-hub:timm/mixer_b16_224.goog_in21k')


def test_files_that_do_not_belong_together(tmp_path, hub_cache):
  cfg = timm_config('goog_in21k', [0.5] * 3, [0.5] * 3, classes=1000)
  write_cached_repo(hub_cache, GOOG, repo_files(tmp_path, timm_state(0), cfg))
  with pytest.raises(official_format.PretrainedError,
                     match='num_classes=1000 but the head has 7'):
    pretrained.load_pretrained(f'hf-hub:{GOOG}')
  state = dict(timm_state(0), **{'stem.norm.weight': np.ones(3, np.float32)})
  write_cached_repo(hub_cache, 'x/y', repo_files(tmp_path, state, timm_config(
      'goog', [0.5] * 3, [0.5] * 3)))
  with pytest.raises(official_format.PretrainedError, match='stem.norm.weight'):
    pretrained.load_pretrained('hf-hub:x/y')
  state = timm_state(0)
  state['blocks.1.norm2.bias'][3] = np.nan
  write_cached_repo(hub_cache, 'x/nan', repo_files(tmp_path, state, timm_config(
      'goog', [0.5] * 3, [0.5] * 3)))
  with pytest.raises(official_format.PretrainedError,
                     match='NaN or infinite .*MixerBlock_1/LayerNorm_1/bias'):
    pretrained.load_pretrained('hf-hub:x/nan')


def test_init_from_hub_name(tmp_path, hub_cache):
  state = timm_state(7)
  write_cached_repo(hub_cache, GOOG, repo_files(
      tmp_path, state, timm_config('goog', [0.5] * 3, [0.5] * 3)))
  from mixer_jax import models  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  target = models.create_model('S_4', 3, num_blocks=BLOCKS, hidden_dim=HIDDEN,
                               tokens_mlp_dim=TOKENS_MLP,
                               channels_mlp_dim=CHANNELS_MLP)
  params = models.init_params(target, jax.random.PRNGKey(0), IMAGE)
  filled = pretrained.init_from_checkpoint(f'hf-hub:{GOOG}', params)
  flat = traverse_util.flatten_dict(filled, sep='/')
  np.testing.assert_array_equal(flat['head/kernel'], 0)  # Fresh 3-class head.
  np.testing.assert_array_equal(
      flat['MixerBlock_1/channel_mixing/Dense_0/kernel'],
      state['blocks.1.mlp_channels.fc1.weight'].T)
  info = pretrained.checkpoint_info(f'hf-hub:{GOOG}')
  assert (info.num_blocks, info.num_classes, info.image_size) == (
      BLOCKS, 7, IMAGE)


def test_exported_timm_file_round_trip(tmp_path):
  """A file from export_timm loads with the official file's outputs."""
  flat = ref.official_checkpoint(3, classes=5)
  path = tmp_path / 'exported.safetensors'
  timm_format.export_timm(traverse_util.unflatten_dict(flat, sep='/'), path)
  model, params = pretrained.load_pretrained(str(path))
  assert model.gelu_approximate  # Written by mixer_jax: official form.
  x = ref.images(0, 2, 16)
  np.testing.assert_allclose(model.apply({'params': params}, x),
                             ref.forward(flat, x), rtol=1e-4, atol=1e-4)


def test_predict_command_with_hub_name(tmp_path, hub_cache):
  """The real environment variables, in a fresh process, as a user runs it."""
  state = timm_state(8, classes=1000)
  write_cached_repo(hub_cache, GOOG, repo_files(
      tmp_path, state, timm_config('goog', [0.5] * 3, [0.5] * 3,
                                   classes=1000)))
  image = tmp_path / 'img.png'
  Image.fromarray(np.random.RandomState(0).randint(
      0, 256, (20, 24, 3)).astype(np.uint8)).save(image)
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, '-m', 'mixer_jax.predict',
       f'--checkpoint=hf-hub:{GOOG}', str(image)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  ranked = [line for line in proc.stdout.splitlines() if line.startswith('  ')]
  assert len(ranked) == 5
  # A 1000-class head gets the ImageNet names.
  names = set((REPO / 'mixer_jax' / 'data' /
               'imagenet2012_classes.txt').read_text().splitlines())
  assert all(line.split(maxsplit=3)[3] in names for line in ranked), ranked


@pytest.mark.parametrize('mode, pct, crop, resize', [
    ('center', 0.875, 'resize_crop', 256),  # timm's ImageNet eval.
    ('squash', 0.875, 'squash_crop', 256),  # Whole image to 256, crop 224.
    ('squash', 1.0, 'resize', 224)])  # Whole image to 224: a plain resize.
def test_timm_crop_mode_is_read_as_our_eval_crop(mode, pct, crop, resize):
  info = hub.read_timm_config({'pretrained_cfg': {
      'crop_mode': mode, 'crop_pct': pct, 'input_size': [3, 224, 224]}})
  assert (info.eval_crop, info.eval_resize(224)) == (crop, resize)
  with pytest.raises(official_format.PretrainedError, match='border'):
    hub.read_timm_config({'pretrained_cfg': {'crop_mode': 'border'}})
