"""Tests for mixer_jax/models.py: sizes, parameter tree, mixing semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixer_jax import models

# Exact counts with a 1000-class head (the official vit_jax tests and the
# published checkpoints agree on these).
EXPECTED_PARAMS = {
    'B_16': 59_880_472,
    'B_32': 60_293_428,
    'L_16': 208_196_168,
}

TINY = dict(num_blocks=2, hidden_dim=16, tokens_mlp_dim=8, channels_mlp_dim=32)


def _count_by_formula(family_sizes, patch, tokens, num_classes):
  """Parameter count from the paper's layer list, written independently."""
  n, c, ds, dc = (family_sizes[k] for k in (
      'num_blocks', 'hidden_dim', 'tokens_mlp_dim', 'channels_mlp_dim'))
  stem = patch * patch * 3 * c + c
  token_mlp = tokens * ds + ds + ds * tokens + tokens
  channel_mlp = c * dc + dc + dc * c + c
  block = 2 * (2 * c) + token_mlp + channel_mlp
  return stem + n * block + 2 * c + c * num_classes + num_classes


@pytest.mark.parametrize('variant', sorted(EXPECTED_PARAMS))
def test_exact_param_counts(variant):
  model = models.create_model(variant, 1000)
  shapes = models.param_shapes(model, 224)
  assert models.count_params(shapes) == EXPECTED_PARAMS[variant]


@pytest.mark.parametrize('variant', models.PAPER_VARIANTS)
def test_every_paper_variant_matches_formula(variant):
  model = models.create_model(variant, 1000)
  spec = models.get_spec(variant)
  tokens = (224 // spec.patch_size) ** 2
  expected = _count_by_formula(models.FAMILIES[variant[0]], spec.patch_size,
                               tokens, 1000)
  assert models.count_params(models.param_shapes(model, 224)) == expected


def test_all_paper_variants_listed():
  assert set(models.PAPER_VARIANTS) == {
      'S_32', 'S_16', 'S_8', 'B_32', 'B_16', 'L_32', 'L_16', 'H_14'}


def test_b16_tree_matches_official():
  shapes = models.param_shapes(models.create_model('B_16', 1000), 224)
  flat = {'/'.join(k.key for k in path): tuple(v.shape)
          for path, v in jax.tree_util.tree_leaves_with_path(shapes)}
  expected = {'stem/kernel': (16, 16, 3, 768), 'stem/bias': (768,),
              'pre_head_layer_norm/scale': (768,),
              'pre_head_layer_norm/bias': (768,),
              'head/kernel': (768, 1000), 'head/bias': (1000,)}
  for i in range(12):
    b = f'MixerBlock_{i}'
    for ln in ('LayerNorm_0', 'LayerNorm_1'):
      expected[f'{b}/{ln}/scale'] = (768,)
      expected[f'{b}/{ln}/bias'] = (768,)
    for mlp, (width, hidden) in (('token_mixing', (196, 384)),
                                 ('channel_mixing', (768, 3072))):
      expected[f'{b}/{mlp}/Dense_0/kernel'] = (width, hidden)
      expected[f'{b}/{mlp}/Dense_0/bias'] = (hidden,)
      expected[f'{b}/{mlp}/Dense_1/kernel'] = (hidden, width)
      expected[f'{b}/{mlp}/Dense_1/bias'] = (width,)
  assert len(flat) == 150
  assert flat == expected


def test_flops_b16():
  model = models.create_model('B_16', 1000)
  assert models.flops_per_image(model, 224) / 1e9 == pytest.approx(25.2,
                                                                   abs=0.05)


def test_variant_names_and_errors():
  assert models.get_spec('Mixer-B_16') == models.get_spec('B/16')
  assert models.get_spec('S_4', num_blocks=2).num_blocks == 2
  with pytest.raises(ValueError, match='Unknown Mixer variant'):
    models.get_spec('X_16')
  with pytest.raises(ValueError, match='override'):
    models.get_spec('B_16', depth=3)
  with pytest.raises(TypeError, match='unknown option'):
    models.create_model('B_16', 10, dropout=0.1)
  with pytest.raises(ValueError, match='stochastic_depth'):
    models.create_model('B_16', 10, stochastic_depth=1.5)
  with pytest.raises(ValueError, match='computation dtype'):
    models.create_model('B_16', 10, dtype='int32')
  with pytest.raises(ValueError, match='computation dtype'):
    models.create_model('B_16', 10, dtype='float33')
  with pytest.raises(TypeError, match='gelu_approximate'):
    models.create_model('B_16', 10, gelu_approximate='no')
  with pytest.raises(ValueError, match='num_classes'):
    models.create_model('B_16', -3)
  model = models.create_model('S_4', 10, **TINY)
  with pytest.raises(ValueError, match='not divisible by the patch'):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 10, 8, 3)))


def _random_params(model, image_size, seed=0):
  """Initialises, then fills every leaf (head, LayerNorms too) randomly."""
  params = models.init_params(model, jax.random.PRNGKey(seed), image_size)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  leaves = [0.5 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, leaves)


def _tokens_after_stem(model, params, images):
  """The (batch, tokens, C) input of the first block, computed separately."""
  p = params['stem']
  patches = jax.lax.conv_general_dilated(
      images, p['kernel'], (model.patch_size,) * 2, 'VALID',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + p['bias']
  return patches.reshape(images.shape[0], -1, model.hidden_dim)


def test_features_mode_and_zero_head():
  model = models.create_model('S_4', None, **TINY)
  images = jax.random.uniform(jax.random.PRNGKey(0), (3, 8, 8, 3), minval=-1)
  params = models.init_params(model, jax.random.PRNGKey(0), 8)
  assert 'head' not in params
  assert model.apply({'params': params}, images).shape == (3, 16)
  classifier = models.create_model('S_4', 10, **TINY, head_bias_init=-6.9)
  params = models.init_params(classifier, jax.random.PRNGKey(0), 8)
  np.testing.assert_array_equal(params['head']['kernel'], 0.0)
  logits = classifier.apply({'params': params}, images)
  np.testing.assert_allclose(logits, -6.9, rtol=1e-6)


def test_token_mixing_mixes_tokens_and_channel_mixing_does_not():
  """Locality: one block with zeroed token mixing keeps tokens independent."""
  model = models.create_model('S_4', None, **dict(TINY, num_blocks=1))
  params = _random_params(model, 16)
  images = jax.random.uniform(jax.random.PRNGKey(2), (1, 16, 16, 3),
                              minval=-1)
  changed = images.at[:, :4, :4, :].set(0.3)  # Only the first patch changes.
  f = lambda p, x: model.apply({'params': p}, x)
  # Through token mixing, a change in one patch reaches every token, so the
  # pooled features differ in a way no single-token change explains; check
  # directly on the block: the per-token output of the mixer block.
  block = models.MixerBlock(TINY['tokens_mlp_dim'], TINY['channels_mlp_dim'],
                            gelu_approximate=True)
  bp = params['MixerBlock_0']
  x0 = _tokens_after_stem(model, params, images)
  x1 = _tokens_after_stem(model, params, changed)
  y0, y1 = (block.apply({'params': bp}, x) for x in (x0, x1))
  moved = np.abs(np.asarray(y1 - y0)).max(axis=-1)[0]
  assert (moved > 1e-4).all()  # Every token felt the first patch.
  no_token_mixing = jax.tree.map(lambda a: a, bp)
  no_token_mixing['token_mixing']['Dense_1'] = jax.tree.map(
      jnp.zeros_like, bp['token_mixing']['Dense_1'])
  y0, y1 = (block.apply({'params': no_token_mixing}, x) for x in (x0, x1))
  moved = np.abs(np.asarray(y1 - y0)).max(axis=-1)[0]
  assert moved[0] > 1e-4 and (moved[1:] == 0).all()  # Channels stay local.
  assert f(params, images).shape == (1, 16)


def test_two_layernorms_not_shared():
  """The seed's bug used one LayerNorm twice; here each has its own weights."""
  model = models.create_model('S_4', None, **dict(TINY, num_blocks=1))
  params = _random_params(model, 8)
  images = jax.random.uniform(jax.random.PRNGKey(3), (2, 8, 8, 3), minval=-1)
  out = model.apply({'params': params}, images)
  swapped = jax.tree.map(lambda a: a, params)
  block = swapped['MixerBlock_0']
  block['LayerNorm_1'] = jax.tree.map(lambda a: a * 2.0 + 0.1,
                                      block['LayerNorm_1'])
  assert not np.allclose(out, model.apply({'params': swapped}, images))
  assert set(params['MixerBlock_0']) == {
      'LayerNorm_0', 'token_mixing', 'LayerNorm_1', 'channel_mixing'}


def test_permuting_tokens_consistently_is_equivariant():
  """Permuting tokens and the token-MLP weights together changes nothing."""
  model = models.create_model('S_4', None, **dict(TINY, num_blocks=1))
  params = _random_params(model, 8)
  block = models.MixerBlock(TINY['tokens_mlp_dim'], TINY['channels_mlp_dim'],
                            gelu_approximate=True)
  bp = params['MixerBlock_0']
  x = jax.random.normal(jax.random.PRNGKey(4), (2, 4, 16))
  perm = np.array([2, 0, 3, 1])
  permuted = jax.tree.map(lambda a: a, bp)
  tm = permuted['token_mixing']
  tm['Dense_0']['kernel'] = bp['token_mixing']['Dense_0']['kernel'][perm]
  tm['Dense_1']['kernel'] = bp['token_mixing']['Dense_1']['kernel'][:, perm]
  tm['Dense_1']['bias'] = bp['token_mixing']['Dense_1']['bias'][perm]
  out = block.apply({'params': bp}, x)
  out_perm = block.apply({'params': permuted}, x[:, perm])
  np.testing.assert_allclose(out[:, perm], out_perm, atol=1e-5)
  # Permuting tokens alone does change the result: the order matters.
  assert not np.allclose(out[:, perm], block.apply({'params': bp}, x[:, perm]),
                         atol=1e-3)


def test_bfloat16_close_to_float32():
  kwargs = dict(TINY, num_blocks=2)
  f32 = models.create_model('S_4', 10, **kwargs)
  bf16 = models.create_model('S_4', 10, dtype='bfloat16', **kwargs)
  params = _random_params(f32, 16)
  images = jax.random.uniform(jax.random.PRNGKey(5), (4, 16, 16, 3), minval=-1)
  a = f32.apply({'params': params}, images)
  b = bf16.apply({'params': params}, images)
  assert b.dtype == jnp.float32
  assert jax.tree.leaves(models.init_params(bf16, jax.random.PRNGKey(0), 16)
                         )[0].dtype == jnp.float32
  # bfloat16 keeps 8 bits of mantissa: about 1% error after a few layers.
  np.testing.assert_allclose(a, b, atol=0.03 * float(jnp.abs(a).max()))
  assert not np.array_equal(a, b)


def test_exact_gelu_option_changes_output():
  tanh = models.create_model('S_4', 10, **TINY)
  exact = models.create_model('S_4', 10, gelu_approximate=False, **TINY)
  params = _random_params(tanh, 8)
  images = jax.random.uniform(jax.random.PRNGKey(6), (2, 8, 8, 3), minval=-1)
  a = tanh.apply({'params': params}, images)
  b = exact.apply({'params': params}, images)
  assert not np.allclose(a, b) and np.allclose(a, b, atol=0.1 * abs(a).max())


def test_stochastic_depth():
  images = jax.random.uniform(jax.random.PRNGKey(7), (8, 8, 8, 3), minval=-1)
  plain = models.create_model('S_4', 10, **TINY)
  params = _random_params(plain, 8)
  ref = plain.apply({'params': params}, images)
  # Off: training mode with an rng is identical to inference.
  np.testing.assert_array_equal(
      ref, plain.apply({'params': params}, images, train=True,
                       rngs={'dropout': jax.random.PRNGKey(0)}))
  sd = models.create_model('S_4', 10, stochastic_depth=0.5, **TINY)
  # On, but inference: deterministic and equal to the plain model.
  np.testing.assert_array_equal(ref, sd.apply({'params': params}, images))
  train = lambda seed: sd.apply({'params': params}, images, train=True,
                                rngs={'dropout': jax.random.PRNGKey(seed)})
  a, b = train(1), train(2)
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, train(1))
  # Block 0 has rate 0 (linear ramp), so some examples must still differ
  # from inference only through later blocks; none may be NaN.
  assert np.isfinite(a).all()


def test_stochastic_depth_without_rng_is_inference():
  sd = models.create_model('S_4', 10, stochastic_depth=0.5, **TINY)
  images = jax.random.uniform(jax.random.PRNGKey(8), (4, 8, 8, 3), minval=-1)
  params = _random_params(sd, 8)
  np.testing.assert_array_equal(sd.apply({'params': params}, images),
                                sd.apply({'params': params}, images,
                                         train=True))


def test_stochastic_depth_ramp_per_example_and_no_rescaling():
  """Block i drops with rate r*i/(N-1); a dropped branch adds nothing and a
  kept one is not rescaled by 1/(1-p) (big_vision's convention)."""
  model = models.create_model('S_4', None, stochastic_depth=0.999,
                              **dict(TINY, num_blocks=2))
  params = _random_params(model, 8)
  images = jax.random.uniform(jax.random.PRNGKey(9), (6, 8, 8, 3), minval=-1)
  # Block 0 has rate 0 and block 1 rate 0.999: training output equals a
  # one-block model (block 1's branches dropped for every example).
  one_block = models.create_model('S_4', None, **dict(TINY, num_blocks=1))
  p1 = {k: v for k, v in params.items() if k != 'MixerBlock_1'}
  expected = one_block.apply({'params': p1}, images)
  got = model.apply({'params': params}, images, train=True,
                    rngs={'dropout': jax.random.PRNGKey(3)})
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  # With rate 0.5 on the last block, drops are drawn per example.
  half = models.create_model('S_4', None, stochastic_depth=0.5,
                             **dict(TINY, num_blocks=2))
  full = half.apply({'params': params}, images)
  out = half.apply({'params': params}, images, train=True,
                   rngs={'dropout': jax.random.PRNGKey(5)})
  # Examples whose block-1 branches were all kept equal inference exactly
  # (no 1/(1-p) factor); with p=0.5 on two branches some were not.
  matches_full = np.isclose(out, full, rtol=1e-5, atol=1e-5).all(axis=-1)
  assert matches_full.any() and not matches_full.all()


def test_remat_changes_memory_not_values():
  images = jax.random.uniform(jax.random.PRNGKey(10), (4, 8, 8, 3), minval=-1)
  labels = jax.nn.one_hot(jnp.arange(4), 10)
  results = []
  for remat in (False, True):
    model = models.create_model('S_4', 10, stochastic_depth=0.3, remat=remat,
                                **TINY)
    params = _random_params(model, 8)

    def loss(p, model=model):
      logits = model.apply({'params': p}, images, train=True,
                           rngs={'dropout': jax.random.PRNGKey(1)})
      return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits), -1))
    results.append(jax.jit(jax.value_and_grad(loss))(params))
    # nn.remat wraps each block in one rematerialised call (jax.checkpoint).
    jaxpr = str(jax.make_jaxpr(loss)(params))
    assert jaxpr.count('remat2[') == (TINY['num_blocks'] if remat else 0)
  (loss_a, grads_a), (loss_b, grads_b) = results
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_intermediate_outputs_are_the_model_stages():
  model = models.create_model('S_4', 10, **TINY)
  params = _random_params(model, 8)
  images = jax.random.uniform(jax.random.PRNGKey(11), (3, 8, 8, 3), minval=-1)
  out = models.intermediate_outputs(model, params, images)
  blocks = TINY['num_blocks']
  assert list(out) == (['stem'] + [f'block_{i}' for i in range(blocks)] +
                       ['pre_logits', 'logits'])
  assert out['stem'].shape == (3, 4, TINY['hidden_dim'])
  np.testing.assert_allclose(out['logits'],
                             model.apply({'params': params}, images),
                             rtol=1e-6)
  features = models.create_model('S_4', None, **TINY)
  np.testing.assert_allclose(out['pre_logits'],
                             features.apply({'params': params}, images),
                             rtol=1e-6)
  # Each block's output is the next block's input.
  block = models.MixerBlock(TINY['tokens_mlp_dim'], TINY['channels_mlp_dim'],
                            gelu_approximate=True)
  np.testing.assert_allclose(
      block.apply({'params': params['MixerBlock_1']}, out['block_0']),
      out['block_1'], rtol=1e-5, atol=1e-6)
