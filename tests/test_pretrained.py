"""Tests for mixer_jax.weights.pretrained: official .npz I/O, checks, head, resolution.

Checkpoints are tiny official-format files with random non-zero leaves, and
expected outputs come from the independent NumPy forward in mixer_reference.
"""

import pickle

from flax import traverse_util
import jax
import jax.numpy as jnp
import mixer_reference as ref
import numpy as np
import optax
import pytest

from mixer_jax import models
from mixer_jax.weights import official_format
from mixer_jax.weights import pretrained


def _write(tmp_path, flat, name='ckpt.npz'):
  path = tmp_path / name
  np.savez(path, **flat)
  return str(path)


def _tiny_model(num_classes=10, **options):
  sizes = dict(num_blocks=2, hidden_dim=32, tokens_mlp_dim=16,
               channels_mlp_dim=64)
  sizes.update(options)
  return models.create_model('S_4', num_classes, **sizes)


def test_load_gives_numpy_reference_logits(tmp_path):
  flat = ref.official_checkpoint(0)
  model, params = pretrained.load_pretrained(_write(tmp_path, flat))
  assert (model.patch_size, model.num_blocks, model.hidden_dim,
          model.tokens_mlp_dim, model.channels_mlp_dim, model.num_classes) == (
              4, 2, 32, 16, 64, 10)
  loaded = traverse_util.flatten_dict(params, sep='/')
  assert set(loaded) == set(flat)
  for key, value in flat.items():
    np.testing.assert_array_equal(loaded[key], value, err_msg=key)
  x = ref.images(1, 3, 16)
  logits = model.apply({'params': params}, x)
  np.testing.assert_allclose(logits, ref.forward(flat, x), rtol=1e-4,
                             atol=1e-4)
  # The reference is sensitive enough to notice a single changed leaf.
  changed = dict(flat, **{'MixerBlock_1/LayerNorm_1/bias':
                          flat['MixerBlock_1/LayerNorm_1/bias'] + 0.5})
  assert np.abs(ref.forward(changed, x) - logits).max() > 1e-2


def test_features_without_head(tmp_path):
  flat = ref.official_checkpoint(1)
  model, params = pretrained.load_pretrained(_write(tmp_path, flat),
                                             num_classes=0)
  assert 'head' not in params
  x = ref.images(2, 2, 16)
  np.testing.assert_allclose(model.apply({'params': params}, x),
                             ref.forward(flat, x, head=False), rtol=1e-4,
                             atol=1e-4)


@pytest.mark.parametrize('variant', models.PAPER_VARIANTS)
def test_infer_architecture_names_paper_variants(variant):
  model = models.create_model(variant, 1000)
  shapes = traverse_util.flatten_dict(models.param_shapes(model, 224), sep='/')
  info = official_format.infer_architecture(shapes)
  assert info.variant == variant
  assert info.image_size == 224 and info.num_classes == 1000
  assert info.describe().startswith(f'Mixer-{variant} at 224x224 with 1000')


def test_missing_extra_and_wrong_leaves_all_listed(tmp_path):
  flat = ref.official_checkpoint(2)
  del flat['MixerBlock_1/LayerNorm_0/scale']
  flat['MixerBlock_0/unknown/kernel'] = np.ones((3, 3), np.float32)
  flat['MixerBlock_1/channel_mixing/Dense_1/bias'] = np.ones(7, np.float32)
  with pytest.raises(official_format.PretrainedError) as e:
    pretrained.load_pretrained(_write(tmp_path, flat))
  message = str(e.value)
  assert '3 mismatched leaves' in message
  assert 'missing from the file: MixerBlock_1/LayerNorm_0/scale' in message
  assert 'extra in the file: MixerBlock_0/unknown/kernel (3, 3)' in message
  assert ('wrong shape: MixerBlock_1/channel_mixing/Dense_1/bias: file (7,), '
          'model (32,)') in message
  assert 'looks like a custom Mixer at 16x16 with 10 classes' in message


def test_other_variant_lists_leaves_and_names_the_file(tmp_path):
  path = _write(tmp_path, ref.official_checkpoint(3, hidden=48))
  target = models.init_params(_tiny_model(), jax.random.PRNGKey(0), 16)
  with pytest.raises(official_format.PretrainedError) as e:
    pretrained.init_from_checkpoint(path, target)
  message = str(e.value)
  assert 'wrong shape: stem/kernel: file (4, 4, 3, 48), model (4, 4, 3, 32)' in (
      message)
  assert 'MixerBlock_1/channel_mixing/Dense_0/kernel' in message
  assert 'C=48' in message and 'patch 4, 2 blocks' in message


def test_fewer_blocks_in_model_reports_extra_leaves(tmp_path):
  path = _write(tmp_path, ref.official_checkpoint(4, blocks=3))
  target = models.init_params(_tiny_model(), jax.random.PRNGKey(0), 16)
  with pytest.raises(official_format.PretrainedError, match='extra in the file: '
                     'MixerBlock_2/'):
    pretrained.init_from_checkpoint(path, target)


def test_truncated_file(tmp_path):
  path = _write(tmp_path, ref.official_checkpoint(5))
  data = open(path, 'rb').read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) * 2 // 3])
  with pytest.raises(official_format.PretrainedError, match='truncated or corrupt'):
    pretrained.load_pretrained(path)


def test_pickled_object_array_refused(tmp_path):
  flat = ref.official_checkpoint(6)
  flat['head/bias'] = np.array([{'evil': 1}], dtype=object)
  path = _write(tmp_path, flat)
  with pytest.raises(official_format.PretrainedError,
                     match="'head/bias' is a pickled object array"):
    official_format.load_npz(path)


def test_pickle_and_non_float_files_refused(tmp_path):
  path = tmp_path / 'p.npz'
  path.write_bytes(pickle.dumps(ref.official_checkpoint(7)))
  with pytest.raises(official_format.PretrainedError,
                     match='is pickled Python data, not a weight file; '
                     'pickled files are refused'):
    official_format.load_npz(str(path))
  ints = _write(tmp_path, {'stem/kernel': np.ones((2, 2), np.int32)}, 'i.npz')
  with pytest.raises(official_format.PretrainedError, match='dtype int32'):
    official_format.load_npz(ints)
  with pytest.raises(FileNotFoundError, match='No checkpoint file'):
    official_format.load_npz(str(tmp_path / 'absent.npz'))


def test_export_round_trip_is_exact(tmp_path):
  flat = ref.official_checkpoint(8)
  _, params = pretrained.load_pretrained(_write(tmp_path, flat))
  out = str(tmp_path / 'sub' / 'exported.npz')
  pretrained.export_official(params, out)
  reread = official_format.load_npz(out)
  assert set(reread) == set(flat)
  for key in flat:
    assert reread[key].dtype == np.float32
    np.testing.assert_array_equal(reread[key], flat[key], err_msg=key)
  _, params2 = pretrained.load_pretrained(out)
  jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_export_of_trained_bfloat16_tree_and_bad_tree(tmp_path):
  model = _tiny_model()
  params = models.init_params(model, jax.random.PRNGKey(1), 16)
  half = jax.tree.map(lambda v: v.astype(jnp.bfloat16), params)
  out = str(tmp_path / 'half.npz')
  pretrained.export_official({'params': half}, out)
  reread = traverse_util.unflatten_dict(official_format.load_npz(out), sep='/')
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(
      a, np.asarray(b, np.float32)), reread, half)
  broken = traverse_util.flatten_dict(params, sep='/')
  del broken['MixerBlock_0/LayerNorm_1/bias']
  with pytest.raises(official_format.PretrainedError, match='missing'):
    pretrained.export_official(
        traverse_util.unflatten_dict(broken, sep='/'), out)


def test_head_replaced_by_fresh_zero_head(tmp_path):
  flat = ref.official_checkpoint(9)
  path = _write(tmp_path, flat)
  model, params = pretrained.load_pretrained(path, num_classes=5)
  assert model.num_classes == 5
  np.testing.assert_array_equal(params['head']['kernel'], np.zeros((32, 5)))
  np.testing.assert_array_equal(params['head']['bias'], np.zeros(5))
  body = {k: v for k, v in traverse_util.flatten_dict(params, sep='/').items()
          if not k.startswith('head/')}
  for key, value in body.items():
    np.testing.assert_array_equal(value, flat[key])
  # init_from_checkpoint keeps the target's own fresh head (here bias -2).
  target_model = _tiny_model(7)
  target_model = target_model.clone(head_bias_init=-2.0)
  target = models.init_params(target_model, jax.random.PRNGKey(3), 16)
  filled = pretrained.init_from_checkpoint(path, target)
  np.testing.assert_array_equal(filled['head']['bias'], np.full(7, -2.0))
  np.testing.assert_array_equal(filled['head']['kernel'], np.zeros((32, 7)))
  np.testing.assert_array_equal(filled['stem']['kernel'], flat['stem/kernel'])
  # Same class count: the checkpoint's head is kept.
  same = pretrained.init_from_checkpoint(
      path, models.init_params(_tiny_model(10), jax.random.PRNGKey(3), 16))
  np.testing.assert_array_equal(same['head']['kernel'], flat['head/kernel'])


def _tiles_2x2(tiles):
  top = np.concatenate([tiles[0], tiles[1]], axis=2)
  bottom = np.concatenate([tiles[2], tiles[3]], axis=2)
  return np.concatenate([top, bottom], axis=1)


def test_resolution_change_tiles_match_original_features(tmp_path):
  flat = ref.official_checkpoint(10)
  model, params = pretrained.load_pretrained(_write(tmp_path, flat),
                                             num_classes=0, image_size=32)
  assert model.tokens_mlp_dim == 4 * 16
  tiles = [ref.images(20 + t, 2, 16) for t in range(4)]
  big = _tiles_2x2(tiles)
  expected = np.mean([ref.forward(flat, t, head=False) for t in tiles], 0)
  np.testing.assert_allclose(model.apply({'params': params}, big), expected,
                             rtol=1e-4, atol=1e-4)
  # The same tiles in another arrangement give other per-token features, so
  # the test would notice tokens mixed across tiles.
  assert not np.allclose(ref.forward(flat, tiles[0], head=False),
                         ref.forward(flat, tiles[1], head=False), atol=1e-2)


def test_resolution_change_factor_three(tmp_path):
  flat = ref.official_checkpoint(11, image=8)
  model, params = pretrained.load_pretrained(_write(tmp_path, flat),
                                             num_classes=0, image_size=24)
  tiles = [ref.images(40 + t, 1, 8) for t in range(9)]
  rows = [np.concatenate(tiles[3 * r:3 * r + 3], axis=2) for r in range(3)]
  big = np.concatenate(rows, axis=1)
  expected = np.mean([ref.forward(flat, t, head=False) for t in tiles], 0)
  np.testing.assert_allclose(model.apply({'params': params}, big), expected,
                             rtol=1e-4, atol=1e-4)


def test_resolution_change_of_a_model_trained_here(tmp_path):
  model = _tiny_model(10)
  params = models.init_params(model, jax.random.PRNGKey(4), 16)
  optimizer = optax.adam(1e-2)
  state = optimizer.init(params)
  x, y = ref.images(5, 8, 16), jnp.arange(8) % 10

  def loss_fn(p):
    logits = model.apply({'params': p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(params, state):
    updates, state = optimizer.update(jax.grad(loss_fn)(params), state, params)
    return optax.apply_updates(params, updates), state

  initial = params
  for _ in range(3):
    params, state = step(params, state)
  assert loss_fn(params) < loss_fn(initial)  # Really trained.
  features = model.clone(num_classes=None)
  big_model = _tiny_model(None, tokens_mlp_dim=64)
  tiles = [ref.images(60 + t, 2, 16) for t in range(4)]
  expected = np.mean([features.apply({'params': params}, t) for t in tiles], 0)
  expanded = pretrained.expand_token_mixing(params, 2)
  np.testing.assert_allclose(
      big_model.apply({'params': expanded}, _tiles_2x2(tiles)), expected,
      rtol=1e-4, atol=1e-4)
  # init_from_checkpoint expands the trained model's file the same way.
  pretrained.export_official(params, tmp_path / 'trained.npz')
  target = models.init_params(_tiny_model(3, tokens_mlp_dim=64),
                              jax.random.PRNGKey(5), 32)
  filled = pretrained.init_from_checkpoint(tmp_path / 'trained.npz', target)
  np.testing.assert_array_equal(
      filled['MixerBlock_1']['token_mixing']['Dense_0']['kernel'],
      expanded['MixerBlock_1']['token_mixing']['Dense_0']['kernel'])
  np.testing.assert_array_equal(filled['head']['kernel'], np.zeros((32, 3)))


@pytest.mark.parametrize('image_size', [24, 8])
def test_non_integer_ratio_explained(tmp_path, image_size):
  path = _write(tmp_path, ref.official_checkpoint(12))
  with pytest.raises(official_format.PretrainedError) as e:
    pretrained.load_pretrained(path, image_size=image_size)
  assert 'not an integer' in str(e.value)
  assert 'Appendix C' in str(e.value) and '224 -> 384' in str(e.value)


def test_unexpanded_hidden_width_gets_a_hint(tmp_path):
  path = _write(tmp_path, ref.official_checkpoint(13))
  target = models.init_params(_tiny_model(10), jax.random.PRNGKey(0), 32)
  with pytest.raises(official_format.PretrainedError,
                     match='K\\^2 \\* D_S = 64'):
    pretrained.init_from_checkpoint(path, target)


def test_resolution_change_on_the_published_grid(tmp_path):
  # The published 224 / patch 16 grid (14x14 tokens, D_S 256) expanded to 448
  # (28x28); narrow channels keep it fast.
  flat = ref.official_checkpoint(14, patch=16, blocks=2, hidden=64,
                                 tokens_mlp=256, channels_mlp=128, image=224,
                                 classes=1000)
  path = _write(tmp_path, flat)
  small, small_params = pretrained.load_pretrained(path, num_classes=0)
  big, big_params = pretrained.load_pretrained(path, num_classes=0,
                                               image_size=448)
  assert big.tokens_mlp_dim == 1024
  tiles = [ref.images(80 + t, 1, 224) for t in range(4)]
  expected = np.mean([small.apply({'params': small_params}, t)
                      for t in tiles], 0)
  np.testing.assert_allclose(
      big.apply({'params': big_params}, _tiles_2x2(tiles)), expected,
      rtol=1e-3, atol=1e-4)
