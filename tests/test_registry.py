"""Tests for mixer_jax.weights.registry: names, cache layout, copying, offline errors."""

import dataclasses
import os

from flax import traverse_util
import mixer_reference as ref
import numpy as np
import pytest

from mixer_jax import models
from mixer_jax.weights import official_format
from mixer_jax.weights import pretrained
from mixer_jax.weights import registry

PUBLISHED = {
    'imagenet1k/Mixer-B_16': ('B_16', 1000),
    'imagenet1k/Mixer-L_16': ('L_16', 1000),
    'imagenet21k/Mixer-B_16': ('B_16', 21843),
    'imagenet21k/Mixer-L_16': ('L_16', 21843),
    'sam/Mixer-B_16': ('B_16', 1000),
    'sam/Mixer-B_32': ('B_32', 1000),
    'gsam/Mixer-B_16': ('B_16', 1000),
    'gsam/Mixer-B_32': ('B_32', 1000),
    'gsam/Mixer-S_16': ('S_16', 1000),
    'gsam/Mixer-S_32': ('S_32', 1000),
    'gsam/Mixer-S_8': ('S_8', 1000),
}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
  monkeypatch.setenv(registry.CACHE_ENV, str(tmp_path / 'cache'))


def test_every_published_checkpoint_is_registered():
  assert set(registry.CHECKPOINTS) == set(PUBLISHED)
  for name, (variant, classes) in PUBLISHED.items():
    entry = registry.get(name)
    assert (entry.variant, entry.num_classes) == (variant, classes)
    assert entry.url == f'gs://mixer_models/{name}.npz'
    assert entry.https_url == (
        f'https://storage.googleapis.com/mixer_models/{name}.npz')
    assert variant in models.PAPER_VARIANTS
    assert entry.dataset == ('imagenet21k' if classes == 21843
                             else 'imagenet2012')


def test_get_accepts_url_and_suffix_and_lists_names_on_error():
  assert registry.get('gs://mixer_models/gsam/Mixer-S_8.npz').name == (
      'gsam/Mixer-S_8')
  assert registry.get('sam/Mixer-B_32.npz').variant == 'B_32'
  with pytest.raises(KeyError, match='imagenet21k/Mixer-L_16'):
    registry.get('imagenet1k/Mixer-H_14')


def test_cache_dir_and_layout(tmp_path, monkeypatch):
  entry = registry.get('imagenet21k/Mixer-L_16')
  assert registry.local_path(entry) == str(
      tmp_path / 'cache' / 'imagenet21k' / 'Mixer-L_16.npz')
  monkeypatch.delenv(registry.CACHE_ENV)
  assert registry.local_path(entry) == os.path.expanduser(
      '~/.cache/mixer_jax/imagenet21k/Mixer-L_16.npz')


def test_fetch_copies_once_into_cache(tmp_path):
  source = tmp_path / 'remote.npz'
  np.savez(source, **ref.official_checkpoint(0))
  entry = dataclasses.replace(registry.get('gsam/Mixer-S_8'), url=str(source))
  path = registry.fetch(entry)
  assert path == registry.local_path(entry)
  assert open(path, 'rb').read() == source.read_bytes()
  source.unlink()  # The cached copy is used from now on.
  assert registry.fetch(entry) == path
  assert not [f for f in os.listdir(os.path.dirname(path)) if 'partial' in f]


def test_offline_message_says_where_to_put_the_file(tmp_path):
  entry = dataclasses.replace(registry.get('gsam/Mixer-S_8'),
                              url=str(tmp_path / 'unreachable.npz'))
  with pytest.raises(registry.CheckpointNotFoundError) as e:
    registry.fetch(entry)
  message = str(e.value)
  assert registry.local_path(entry) in message
  assert 'gsutil cp' in message and 'MIXER_JAX_CACHE' in message
  assert not os.listdir(os.path.dirname(registry.local_path(entry)))


def test_resolve_paths_names_and_errors(tmp_path):
  local = tmp_path / 'mine.npz'
  np.savez(local, **ref.official_checkpoint(1))
  assert registry.resolve(str(local)) == (str(local), None)
  with pytest.raises(registry.CheckpointNotFoundError, match='Known names'):
    registry.resolve(str(tmp_path / 'nothing.npz'))
  with pytest.raises(registry.CheckpointNotFoundError, match='directory'):
    registry.resolve(str(tmp_path))
  # A registry name resolves to its cached file without any download.
  entry = registry.get('gsam/Mixer-S_32')
  os.makedirs(os.path.dirname(registry.local_path(entry)))
  np.savez(registry.local_path(entry), **ref.official_checkpoint(2))
  assert registry.resolve('gsam/Mixer-S_32') == (
      registry.local_path(entry), entry)


def test_load_by_name_checks_the_cached_file_is_that_checkpoint():
  entry = registry.get('gsam/Mixer-S_32')
  os.makedirs(os.path.dirname(registry.local_path(entry)))
  np.savez(registry.local_path(entry), **ref.official_checkpoint(3))
  with pytest.raises(official_format.PretrainedError) as e:
    pretrained.load_pretrained('gsam/Mixer-S_32')
  assert 'should hold gsam/Mixer-S_32 (Mixer-S_32, 1000 classes)' in str(
      e.value)
  assert 'looks like a custom Mixer at 16x16 with 10 classes' in str(e.value)


def test_load_by_name_of_a_real_size_s32_file():
  # A Mixer-S/32 file of the published shapes (random weights) in the cache.
  entry = registry.get('gsam/Mixer-S_32')
  shapes = traverse_util.flatten_dict(models.param_shapes(
      models.create_model('S_32', 1000), 224), sep='/')
  rng = np.random.RandomState(0)
  flat = {k: rng.standard_normal(s.shape).astype(np.float32) * 0.02
          for k, s in shapes.items()}
  os.makedirs(os.path.dirname(registry.local_path(entry)))
  np.savez(registry.local_path(entry), **flat)
  model, params = pretrained.load_pretrained('gsam/Mixer-S_32')
  assert (model.num_blocks, model.hidden_dim, model.patch_size) == (8, 512, 32)
  assert models.count_params(params) == models.count_params(shapes)
  np.testing.assert_array_equal(
      params['MixerBlock_7']['channel_mixing']['Dense_1']['kernel'],
      flat['MixerBlock_7/channel_mixing/Dense_1/kernel'])
