"""Tests for mixer_jax.weights.hub_publish: a Hub folder timm and we both load.

The folder is read back through `hf-hub:` from an offline Hub cache written
in huggingface_hub's layout (tests/test_hub.py), and, where torch and timm
are installed, by `timm.create_model('hf-hub:...', pretrained=True)`.
"""

import json
import os

import mixer_reference as ref
import numpy as np
import pytest
import timm_process
from test_hub import hub_cache  # pylint: disable=unused-import
from test_hub import write_cached_repo

from mixer_jax import models
from mixer_jax.weights import any_checkpoint
from mixer_jax.weights import hub_publish
from mixer_jax.weights import pretrained
from mixer_jax.weights import timm_format


def _npz(tmp_path, **sizes):
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'in' / 'weights.npz'
  pretrained.export_official(traverse_util.unflatten_dict(
      ref.official_checkpoint(7, **sizes), sep='/'), path)
  return str(path)


def _cache(hub_cache_dir, repo_id, folder):
  files = {name: open(os.path.join(folder, name), 'rb').read()
           for name in os.listdir(folder)}
  write_cached_repo(hub_cache_dir, repo_id, files)


def test_folder_loads_back_through_the_hub_with_the_same_logits(
    tmp_path, hub_cache):
  loaded = any_checkpoint.load(_npz(tmp_path))
  loaded.class_names = [f'class {i}' for i in range(10)]
  out = str(tmp_path / 'folder')
  paths = hub_publish.write_folder(
      loaded, out, repo_id='me/tiny', evaluations=[hub_publish.Evaluation(
          'eval', 'digits', 'test', 'top-1 accuracy', 0.9861, 1500)])
  assert sorted(os.listdir(out)) == sorted(
      ['model.safetensors', 'config.json', 'README.md',
       os.path.basename(paths['npz'])])
  config = json.load(open(paths['config']))
  # No timm name has patch 4, 2 blocks, width 32: timm must build it by hand.
  assert 'architecture' not in config
  assert config['num_classes'] == 10 and config['label_names'][3] == 'class 3'
  cfg = config['pretrained_cfg']
  assert cfg['mean'] == cfg['std'] == [0.5] * 3  # x/255 -> [-1, 1].
  assert cfg['input_size'] == [3, 16, 16]
  assert cfg['crop_pct'] == pytest.approx(16 / round(16 * 256 / 224))
  assert config['mixer_jax']['gelu_approximate'] is True
  _cache(hub_cache, 'me/tiny', out)
  back = any_checkpoint.load('hf-hub:me/tiny')
  assert back.model.gelu_approximate  # Read from our field, not guessed.
  assert back.class_names == loaded.class_names
  x = ref.images(0, 3, 16)
  np.testing.assert_array_equal(
      back.model.apply({'params': back.params}, x),
      loaded.model.apply({'params': loaded.params}, x))
  # The official .npz beside it holds the same tree.
  npz = any_checkpoint.load(paths['npz'])
  np.testing.assert_array_equal(npz.model.apply({'params': npz.params}, x),
                                loaded.model.apply({'params': loaded.params},
                                                   x))
  card = open(paths['card']).read()
  assert card.startswith('---\nlicense:')
  for text in ('98.61%', '| eval | digits | test |', 'hf-hub:me/tiny',
               'tanh approximation', 'MlpMixer(num_classes=10, img_size=16, '
               'patch_size=4, num_blocks=2, embed_dim=32, mlp_ratio=(0.5, '
               '2.0))'):
    assert text in card, text


def test_exact_gelu_weights_keep_their_form(tmp_path, hub_cache):
  loaded = any_checkpoint.load(_npz(tmp_path), gelu_approximate=False)
  out = str(tmp_path / 'folder')
  hub_publish.write_folder(loaded, out)
  config = json.load(open(os.path.join(out, 'config.json')))
  assert config['mixer_jax']['gelu_approximate'] is False
  assert 'exact_gelu_difference' not in config['mixer_jax']
  _cache(hub_cache, 'me/exact', out)
  assert not any_checkpoint.load('hf-hub:me/exact').model.gelu_approximate


def test_gelu_gap_is_measured_against_the_exact_form():
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  params = traverse_util.unflatten_dict(ref.official_checkpoint(3), sep='/')
  model = models.create_model('S_4', 10, num_blocks=2, hidden_dim=32,
                              tokens_mlp_dim=16, channels_mlp_dim=64)
  gap = hub_publish.gelu_gap(model, params, 16, batch=4)
  x = np.random.RandomState(0).uniform(-1, 1, (4, 16, 16, 3)).astype(
      np.float32)
  exact = models.create_model('S_4', 10, num_blocks=2, hidden_dim=32,
                              tokens_mlp_dim=16, channels_mlp_dim=64,
                              gelu_approximate=False)
  expected = np.abs(model.apply({'params': params}, x) -
                    exact.apply({'params': params}, x)).max()
  assert gap['max_abs_logit_difference'] == pytest.approx(float(expected))
  assert 0 < gap['max_abs_logit_difference'] < 0.1
  assert gap['images'] == 4 and 0 <= gap['top1_agreement'] <= 1


@pytest.mark.parametrize('variant,image,expected', [
    # timm's registered Mixers (timm/models/mlp_mixer.py): names fix the
    # patch, depth and width; the image size and MLP ratios stay open.
    ('S_16', 224, ('mixer_s16_224', {})),
    ('B_32', 224, ('mixer_b32_224', {})),
    ('L_16', 448, ('mixer_l16_224', {'img_size': 448})),
    ('S_8', 224, (None, {})),
    ('H_14', 224, (None, {})),
])
def test_timm_architecture_names(variant, image, expected):
  model = models.create_model(variant, 10)
  assert hub_publish.timm_architecture(model, image) == expected


def test_other_mlp_widths_go_in_model_args():
  model = models.create_model('B_16', 10, tokens_mlp_dim=192)
  assert hub_publish.timm_architecture(model, 224) == (
      'mixer_b16_224', {'mlp_ratio': [0.25, 4.0]})


def test_push_needs_a_token_and_the_network(tmp_path, monkeypatch):
  from huggingface_hub import constants  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('HF_HOME', str(tmp_path / 'empty_home'))
  monkeypatch.delenv('HF_TOKEN', raising=False)
  monkeypatch.setattr(constants, 'HF_TOKEN_PATH',
                      str(tmp_path / 'empty_home' / 'token'))
  monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
  with pytest.raises(hub_publish.PublishError, match='no Hugging Face token'):
    hub_publish.push_folder(str(tmp_path), 'me/model')
  monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
  with pytest.raises(hub_publish.PublishError, match='HF_HUB_OFFLINE'):
    hub_publish.push_folder(str(tmp_path), 'me/model')
  with pytest.raises(ValueError):
    hub_publish.push_folder(str(tmp_path), 'not a repo name')


def test_evaluations_from_a_workdirs_records():
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict({
      'dataset': 'digits', 'eval_split': 'train[90%:]',
      'evals': {'test': {'kind': 'classification', 'dataset': 'digits',
                         'split': 'test'},
                'real': {'kind': 'real', 'dataset': 'imagenet2012_real',
                         'split': 'validation'}}})
  records = [{'step': 50, 'eval_accuracy': 0.5},
             {'step': 100, 'eval_accuracy': 0.75, 'eval_top5': 0.95,
              'train_loss': 0.1},
             {'step': 100, 'test/accuracy': 0.7, 'test/loss': 1.0,
              'real/accuracy': 0.6, 'unknown/accuracy': 0.1}]
  got = hub_publish.evaluations_from_records(records, config)
  assert [(e.name, e.split, e.metric, e.value, e.step) for e in got] == [
      ('eval', 'train[90%:]', 'top-1 accuracy', 0.75, 100),
      ('eval', 'train[90%:]', 'top-5 accuracy', 0.95, 100),
      ('real', 'validation', 'ReaL top-1 accuracy', 0.6, 100),
      ('test', 'test', 'top-1 accuracy', 0.7, 100)]


@timm_process.needs_timm
def test_timm_loads_the_folder_by_its_hub_name(tmp_path, hub_cache):
  """Real timm: create_model('hf-hub:...', pretrained=True) on the folder."""
  import jax  # pylint: disable=g-import-not-at-top
  model = models.create_model('S_16', 10)
  params = models.init_params(model, jax.random.PRNGKey(0), 32)
  rng = np.random.RandomState(1)
  params = dict(params, head={
      'kernel': rng.normal(0, 0.05, (512, 10)).astype(np.float32),
      'bias': np.zeros(10, np.float32)})
  loaded = any_checkpoint.Loaded(
      model=model, params=params, kind='official', source='random S/16',
      image_size=32, eval_crop='resize', eval_resize=32)
  out = str(tmp_path / 'folder')
  hub_publish.write_folder(loaded, out, repo_id='me/s16')
  _cache(hub_cache, 'me/s16', out)
  x = ref.images(2, 2, 32)
  got = timm_process.run("""
model = timm.create_model('hf-hub:me/s16', pretrained=True).eval()
with torch.no_grad():
  outputs['logits'] = model(torch.from_numpy(
      inputs['images'].transpose(0, 3, 1, 2).copy())).numpy()
cfg = timm.data.resolve_data_config({}, model=model)
outputs['mean'] = np.array(cfg['mean'])
outputs['input_size'] = np.array(cfg['input_size'])
outputs['keys'] = np.array(sorted(model.state_dict()))
""", images=x)
  exact = model.clone(gelu_approximate=False).apply({'params': params}, x)
  np.testing.assert_allclose(got['logits'], exact, rtol=1e-4, atol=1e-4)
  # timm computes the exact-GELU function, as the card says, not the tanh one.
  tanh = model.apply({'params': params}, x)
  assert np.abs(got['logits'] - tanh).max() > 1e-6
  np.testing.assert_array_equal(got['mean'], [0.5] * 3)
  np.testing.assert_array_equal(got['input_size'], [3, 32, 32])
  assert list(got['keys']) == sorted(timm_format.to_timm_state_dict(params))
