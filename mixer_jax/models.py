"""MLP-Mixer (Tolstikhin et al., arXiv 2105.01601) as Flax linen modules.

The submodule names reproduce the parameter tree of the official checkpoints
(`gs://mixer_models/...`), so a published `.npz` maps onto `params` leaf for
leaf: `stem`, `MixerBlock_{i}/{LayerNorm_0,token_mixing,LayerNorm_1,
channel_mixing}`, `pre_head_layer_norm`, `head`.

This module depends only on jax and flax: it knows nothing of data, training
or checkpoint files.
"""

import dataclasses
import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class MixerSpec:
  """Sizes that define one Mixer variant (paper, Table 1).

  Attributes:
    patch_size: side of the square patches (the stem's kernel and stride).
    num_blocks: number of Mixer blocks, N.
    hidden_dim: channels per token, C.
    tokens_mlp_dim: hidden width of the token-mixing MLP, D_S.
    channels_mlp_dim: hidden width of the channel-mixing MLP, D_C.
  """
  patch_size: int
  num_blocks: int
  hidden_dim: int
  tokens_mlp_dim: int
  channels_mlp_dim: int


# The one table of model sizes: family -> (N, C, D_S, D_C) and its patch sizes.
FAMILIES = {
    'S': dict(num_blocks=8, hidden_dim=512, tokens_mlp_dim=256,
              channels_mlp_dim=2048),
    'B': dict(num_blocks=12, hidden_dim=768, tokens_mlp_dim=384,
              channels_mlp_dim=3072),
    'L': dict(num_blocks=24, hidden_dim=1024, tokens_mlp_dim=512,
              channels_mlp_dim=4096),
    'H': dict(num_blocks=32, hidden_dim=1280, tokens_mlp_dim=640,
              channels_mlp_dim=5120),
}
PAPER_PATCH_SIZES = {'S': (32, 16, 8), 'B': (32, 16), 'L': (32, 16), 'H': (14,)}
# Variant names as the official checkpoints spell them (`Mixer-B_16.npz`).
# Computation dtypes the model supports; parameters are always float32.
COMPUTE_DTYPES = (jnp.dtype('float32'), jnp.dtype('bfloat16'),
                  jnp.dtype('float16'))
PAPER_VARIANTS = tuple(f'{family}_{patch}'
                       for family, patches in PAPER_PATCH_SIZES.items()
                       for patch in patches)

_VARIANT_RE = re.compile(r'^(?:Mixer-)?([SBLH])[_/](\d+)$')


def get_spec(variant: str, **overrides: int) -> MixerSpec:
  """Returns the sizes of `variant`, e.g. "B_16", "Mixer-B_16" or "B/16".

  Any family may be combined with any patch size ("S_4" for small images);
  the paper's own combinations are listed in `PAPER_VARIANTS`. Keyword
  overrides replace single sizes (`num_blocks=2`), which is how configs build
  small models for tests and the quick-start.
  """
  match = _VARIANT_RE.match(variant)
  if match is None:
    raise ValueError(
        f'Unknown Mixer variant {variant!r}: expected FAMILY_PATCH with '
        f'FAMILY one of {sorted(FAMILIES)} and PATCH an integer, e.g. '
        f'"B_16". The paper variants are {", ".join(PAPER_VARIANTS)}.')
  family, patch = match.group(1), int(match.group(2))
  fields = dict(FAMILIES[family], patch_size=patch)
  unknown = set(overrides) - set(fields)
  if unknown:
    raise ValueError(f'Unknown model size override(s) {sorted(unknown)}; '
                     f'valid ones are {sorted(fields)}.')
  fields.update({k: v for k, v in overrides.items() if v is not None})
  for name, value in fields.items():
    if not isinstance(value, (int, np.integer)) or value <= 0:
      raise ValueError(f'Model size {name}={value!r} must be a positive int.')
  return MixerSpec(**fields)


class MlpBlock(nn.Module):
  """Dense -> GELU -> Dense over the last axis, back to the input width.

  Attributes:
    mlp_dim: hidden width.
    gelu_approximate: tanh GELU (as the official weights were trained) when
      True, exact erf GELU (PyTorch/timm) when False.
    dtype: computation dtype; parameters stay float32.
  """
  mlp_dim: int
  gelu_approximate: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.Dense(self.mlp_dim, dtype=self.dtype)(x)
    y = nn.gelu(y, approximate=self.gelu_approximate)
    return nn.Dense(x.shape[-1], dtype=self.dtype)(y)


class MixerBlock(nn.Module):
  """Token mixing then channel mixing, each after its own LayerNorm.

  Input and output are (batch, tokens, channels). Every product contracts a
  non-batch axis of a 3-D array, so a batch sharded over devices stays
  sharded through the block (no reshape merges the batch axis).

  Attributes:
    tokens_mlp_dim: hidden width of the token-mixing MLP (D_S).
    channels_mlp_dim: hidden width of the channel-mixing MLP (D_C).
    stochastic_depth: probability of dropping each residual branch per
      example while training. As in big_vision, kept branches are not
      rescaled by 1/(1-p), so the paper's rate (0.1) means what it meant there.
    gelu_approximate: see `MlpBlock`.
    dtype: computation dtype.
  """
  tokens_mlp_dim: int
  channels_mlp_dim: int
  stochastic_depth: float = 0.0
  gelu_approximate: bool = True
  dtype: Any = jnp.float32

  def _keep_mask(self, x, train):
    """Per-example 0/1 multiplier for a residual branch, or 1 if inactive."""
    # Inference, a zero rate, or no 'dropout' rng: the branch is always kept.
    if (not train or self.stochastic_depth <= 0.0 or
        not self.has_rng('dropout')):
      return 1.0
    drop = jax.random.bernoulli(self.make_rng('dropout'),
                                self.stochastic_depth, (x.shape[0], 1, 1))
    return 1.0 - drop.astype(x.dtype)

  # `train` is positional so that `nn.remat` can mark it static.
  @nn.compact
  def __call__(self, x, train=False):
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='LayerNorm_0')(x)
    y = jnp.swapaxes(y, 1, 2)
    y = MlpBlock(self.tokens_mlp_dim, self.gelu_approximate, self.dtype,
                 name='token_mixing')(y)
    x = x + jnp.swapaxes(y, 1, 2) * self._keep_mask(x, train)
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='LayerNorm_1')(x)
    y = MlpBlock(self.channels_mlp_dim, self.gelu_approximate, self.dtype,
                 name='channel_mixing')(y)
    return x + y * self._keep_mask(x, train)


class MlpMixer(nn.Module):
  """The MLP-Mixer classifier.

  Input: NHWC float images scaled to [-1, 1], height and width divisible by
  `patch_size`. Output: float32 logits (batch, num_classes), or the pooled
  (batch, hidden_dim) features when `num_classes` is None or 0.

  Intermediate outputs are sown into the 'intermediates' collection as
  `stem_out` and `block_{i}` (batch, tokens, channels), `pre_logits` (batch,
  channels) and `logits`; `intermediate_outputs` returns them as a dict.

  Attributes:
    num_classes: size of the head; None or 0 for no head (features).
    patch_size, num_blocks, hidden_dim, tokens_mlp_dim, channels_mlp_dim:
      see `MixerSpec`.
    stochastic_depth: largest drop rate, reached by the last block; block i
      of N uses stochastic_depth * i / (N - 1). Active only with train=True
      and a 'dropout' rng.
    gelu_approximate: tanh GELU (official) or exact GELU (timm).
    head_bias_init: initial value of the head bias (-6.9 for the paper's
      sigmoid-loss ImageNet recipe); the head kernel starts at zero.
    dtype: computation dtype (float32, or bfloat16 on accelerators);
      parameters are always float32.
    remat: recompute each block's activations in the backward pass instead
      of storing them (`nn.remat`): less memory for about one more forward.
  """
  num_classes: Optional[int]
  patch_size: int
  num_blocks: int
  hidden_dim: int
  tokens_mlp_dim: int
  channels_mlp_dim: int
  stochastic_depth: float = 0.0
  gelu_approximate: bool = True
  head_bias_init: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, images, *, train=False):
    if images.ndim != 4:
      raise ValueError(f'Expected NHWC images, got shape {images.shape}.')
    height, width = images.shape[1:3]
    if height % self.patch_size or width % self.patch_size:
      raise ValueError(
          f'Image size {height}x{width} is not divisible by the patch size '
          f'{self.patch_size}; resize or crop the images to a multiple of it.')
    p = self.patch_size
    x = nn.Conv(self.hidden_dim, (p, p), strides=(p, p), padding='VALID',
                dtype=self.dtype, name='stem')(images)
    x = x.reshape(x.shape[0], -1, x.shape[-1])  # Row-major patch order.
    # Sown as 'stem_out': 'stem' is the name of the convolution's scope.
    self.sow('intermediates', 'stem_out', x)
    block = (nn.remat(MixerBlock, static_argnums=(2,)) if self.remat
             else MixerBlock)
    for i in range(self.num_blocks):
      rate = self.stochastic_depth * i / max(self.num_blocks - 1, 1)
      x = block(self.tokens_mlp_dim, self.channels_mlp_dim, rate,
                self.gelu_approximate, self.dtype,
                name=f'MixerBlock_{i}')(x, train)
      self.sow('intermediates', f'block_{i}', x)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype,
                     name='pre_head_layer_norm')(x)
    x = jnp.mean(x.astype(jnp.float32), axis=1)  # Over tokens.
    self.sow('intermediates', 'pre_logits', x)
    if not self.num_classes:
      return x
    x = nn.Dense(self.num_classes, dtype=jnp.float32, name='head',
                 kernel_init=nn.initializers.zeros,
                 bias_init=nn.initializers.constant(self.head_bias_init))(x)
    self.sow('intermediates', 'logits', x)
    return x


def intermediate_outputs(model: MlpMixer, params, images, **kwargs):
  """Runs the model and returns its intermediate outputs by name.

  Returns:
    Dict with `stem`, `block_0` ... `block_{N-1}` (batch, tokens, channels),
    `pre_logits` (batch, channels) and, with a head, `logits`.
  """
  _, state = model.apply({'params': params}, images,
                         mutable=['intermediates'], **kwargs)
  return {'stem' if name == 'stem_out' else name: values[0]
          for name, values in state['intermediates'].items()}


def create_model(variant: str, num_classes: Optional[int] = 1000, *,
                 dtype: Any = 'float32', **options) -> MlpMixer:
  """Returns the `MlpMixer` module for a variant name such as "B_16".

  Args:
    variant: FAMILY_PATCH, e.g. "B_16" or "S_8" (see `get_spec`).
    num_classes: head size; None or 0 returns pooled features instead.
    dtype: computation dtype, a name ("float32", "bfloat16") or a jnp dtype.
    **options: size overrides accepted by `get_spec` (`num_blocks=2`, ...)
      and module options that keep the parameter tree unchanged:
      `stochastic_depth`, `gelu_approximate`, `head_bias_init`, `remat`.
  """
  size_fields = {f.name for f in dataclasses.fields(MixerSpec)}
  sizes = {k: options.pop(k) for k in list(options) if k in size_fields}
  spec = get_spec(variant, **sizes)
  allowed = {'stochastic_depth', 'gelu_approximate', 'head_bias_init',
             'remat'}
  unknown = set(options) - allowed
  if unknown:
    raise TypeError(f'create_model got unknown option(s) {sorted(unknown)}; '
                    f'valid: {sorted(allowed | size_fields | {"dtype"})}.')
  rate = options.get('stochastic_depth', 0.0)
  if not 0.0 <= rate < 1.0:
    raise ValueError(f'stochastic_depth={rate} must be in [0, 1).')
  if not isinstance(options.get('gelu_approximate', True), bool):
    raise TypeError('gelu_approximate must be True (tanh GELU, official) or '
                    'False (exact GELU, timm).')
  try:
    compute_dtype = jnp.dtype(dtype)
  except TypeError:
    compute_dtype = None
  if compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f'dtype={dtype!r} is not a computation dtype of the '
                     f'model; use one of {[d.name for d in COMPUTE_DTYPES]}.')
  if num_classes is not None and (not isinstance(num_classes, (int, np.integer))
                                  or num_classes < 0):
    raise ValueError(f'num_classes={num_classes!r} must be an int >= 0 (0 or '
                     'None: no head, pooled features).')
  return MlpMixer(num_classes=num_classes, dtype=compute_dtype,
                  **dataclasses.asdict(spec), **options)


def num_tokens(model: MlpMixer, image_size) -> int:
  """Tokens per image of side `image_size` or size (height, width)."""
  height, width = ((image_size, image_size) if np.ndim(image_size) == 0
                   else image_size)
  if height % model.patch_size or width % model.patch_size:
    raise ValueError(f'image size {height}x{width} is not divisible by the '
                     f'patch size {model.patch_size}.')
  return (height // model.patch_size) * (width // model.patch_size)


def count_params(params) -> int:
  """Total number of scalars in a parameter tree (works on shape structs)."""
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(params)))


def flops_per_image(model: MlpMixer, image_size) -> int:
  """Forward-pass FLOPs of one image, counting 2 per multiply-add.

  `image_size` is the side of a square image or its (height, width).

  Only the matrix products are counted (stem, the two MLPs of every block,
  head); LayerNorm, GELU, residual adds and pooling are a fraction of a
  percent for the paper's variants. Mixer-B/16 at 224 gives 25.2 GFLOP.
  """
  tokens = num_tokens(model, image_size)
  c = model.hidden_dim
  stem = tokens * model.patch_size ** 2 * 3 * c
  token_mlp = 2 * c * tokens * model.tokens_mlp_dim
  channel_mlp = 2 * tokens * c * model.channels_mlp_dim
  head = c * (model.num_classes or 0)
  macs = stem + model.num_blocks * (token_mlp + channel_mlp) + head
  return 2 * macs


def init_params(model: MlpMixer, rng, image_size: int):
  """Initialises float32 parameters for square images of `image_size`."""
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return model.init(rng, images)['params']


def param_shapes(model: MlpMixer, image_size: int):
  """The parameter tree as `jax.ShapeDtypeStruct`s, without allocating it."""
  return jax.eval_shape(
      lambda: init_params(model, jax.random.PRNGKey(0), image_size))
