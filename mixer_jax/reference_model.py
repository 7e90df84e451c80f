"""The simplest straightforward Flax MLP-Mixer, kept as a yardstick.

`mixer_jax.models` is tuned for speed; this module is the plain textbook
version of the same function (paper, Section 2), written the way one would
write it first: `nn.Conv` stem, `nn.Dense` layers, a transpose before and
after token mixing. It has the same parameter tree as `models.MlpMixer`, so
one set of parameters (or an official checkpoint) runs in both, which is what
`python -m mixer_jax.benchmark --mode=compare` and the equivalence tests do.

It deliberately has no stochastic depth and no other training extras: it is a
reference for speed and numerics, not a second model to train.
"""

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from mixer_jax import models


class ReferenceMlpBlock(nn.Module):
  """Dense -> GELU -> Dense over the last axis."""
  mlp_dim: int
  gelu_approximate: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.Dense(self.mlp_dim, dtype=self.dtype)(x)
    y = nn.gelu(y, approximate=self.gelu_approximate)
    return nn.Dense(x.shape[-1], dtype=self.dtype)(y)


class ReferenceMixerBlock(nn.Module):
  """LayerNorm, token MLP on the transposed input, LayerNorm, channel MLP."""
  tokens_mlp_dim: int
  channels_mlp_dim: int
  gelu_approximate: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
    y = jnp.swapaxes(y, 1, 2)
    y = ReferenceMlpBlock(self.tokens_mlp_dim, self.gelu_approximate,
                          self.dtype, name='token_mixing')(y)
    x = x + jnp.swapaxes(y, 1, 2)
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
    return x + ReferenceMlpBlock(self.channels_mlp_dim, self.gelu_approximate,
                                 self.dtype, name='channel_mixing')(y)


class ReferenceMlpMixer(nn.Module):
  """Patch stem, N Mixer blocks, LayerNorm, mean over tokens, linear head.

  Attributes mean what they mean on `models.MlpMixer`.
  """
  num_classes: Optional[int]
  patch_size: int
  num_blocks: int
  hidden_dim: int
  tokens_mlp_dim: int
  channels_mlp_dim: int
  gelu_approximate: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, *, train=False):
    del train  # Same signature as models.MlpMixer; nothing differs here.
    p = self.patch_size
    x = nn.Conv(self.hidden_dim, (p, p), strides=(p, p), padding='VALID',
                dtype=self.dtype, name='stem')(images)
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    for i in range(self.num_blocks):
      x = ReferenceMixerBlock(self.tokens_mlp_dim, self.channels_mlp_dim,
                              self.gelu_approximate, self.dtype,
                              name=f'MixerBlock_{i}')(x)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype,
                     name='pre_head_layer_norm')(x)
    x = jnp.mean(x.astype(jnp.float32), axis=1)
    if not self.num_classes:
      return x
    return nn.Dense(self.num_classes, dtype=jnp.float32, name='head',
                    kernel_init=nn.initializers.zeros)(x)


def create_reference_model(variant: str, num_classes: Optional[int] = 1000, *,
                           dtype: Any = 'float32',
                           gelu_approximate: bool = True,
                           **sizes: int) -> ReferenceMlpMixer:
  """Returns the reference Mixer for `variant` (sizes as `models.get_spec`).

  Args:
    variant: FAMILY_PATCH, e.g. "B_16".
    num_classes: head size; None or 0 returns pooled features.
    dtype: computation dtype name or jnp dtype; parameters stay float32.
    gelu_approximate: tanh GELU (official) or exact erf GELU.
    **sizes: overrides such as `num_blocks=2`, `hidden_dim=32`.

  Returns:
    A `ReferenceMlpMixer` whose parameter tree equals that of
    `models.create_model(variant, num_classes, **sizes)`.
  """
  spec = models.get_spec(variant, **sizes)
  return ReferenceMlpMixer(
      num_classes=num_classes, patch_size=spec.patch_size,
      num_blocks=spec.num_blocks, hidden_dim=spec.hidden_dim,
      tokens_mlp_dim=spec.tokens_mlp_dim,
      channels_mlp_dim=spec.channels_mlp_dim,
      gelu_approximate=gelu_approximate, dtype=jnp.dtype(dtype))
