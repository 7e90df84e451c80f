"""MLP-Mixer (Tolstikhin et al., arXiv 2105.01601) as Flax linen modules.

The submodule names reproduce the parameter tree of the official checkpoints
(`gs://mixer_models/...`), so a published `.npz` maps onto `params` leaf for
leaf: `stem`, `MixerBlock_{i}/{LayerNorm_0,token_mixing,LayerNorm_1,
channel_mixing}`, `pre_head_layer_norm`, `head`.

This module depends only on jax and flax: it knows nothing of data, training
or checkpoint files.
"""

import dataclasses
import functools
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


_SQRT_2_OVER_PI = float(np.sqrt(2.0 / np.pi))


def _gelu_derivative(z, approximate):
  """d gelu(z) / dz for float32 `z` (tanh or exact form)."""
  if approximate:
    t = jnp.tanh(_SQRT_2_OVER_PI * (z + 0.044715 * z ** 3))
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_OVER_PI * (
        1.0 + 3.0 * 0.044715 * z * z)
  cdf = 0.5 * (1.0 + jax.lax.erf(z * float(1.0 / np.sqrt(2.0))))
  return cdf + z * jnp.exp(-0.5 * z * z) * float(1.0 / np.sqrt(2.0 * np.pi))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _bias_gelu(h, bias, approximate):
  """gelu(h + bias), keeping only `h` for the backward pass."""
  return jax.nn.gelu(h + bias, approximate=approximate)


def _bias_gelu_fwd(h, bias, approximate):
  return _bias_gelu(h, bias, approximate), (h, bias)


def _bias_gelu_bwd(approximate, residuals, grad):
  # Autodiff would store tanh(...) of the widest activation for the backward
  # pass (one more write and read of the MLP's hidden tensor per layer); the
  # derivative is recomputed from h instead, fused into the one loop that
  # reads the incoming gradient. The barrier keeps XLA from merging this
  # recomputation with the forward's tanh, which would store it again.
  h, bias = jax.lax.optimization_barrier(residuals)
  z = (h + bias).astype(jnp.float32)
  dz = grad.astype(jnp.float32) * _gelu_derivative(z, approximate)
  axes = tuple(i for i, n in enumerate(bias.shape) if n == 1 < h.shape[i])
  dbias = jnp.sum(dz, axis=axes, keepdims=True).astype(bias.dtype)
  return dz.astype(h.dtype), dbias


_bias_gelu.defvjp(_bias_gelu_fwd, _bias_gelu_bwd)


class DenseParams(nn.Module):
  """The `kernel` and `bias` of an `nn.Dense`, without applying them.

  Same names, shapes, dtype (float32) and initialisers as `nn.Dense`, so the
  parameter tree and its initial values match the official layout, while
  `MlpBlock` chooses how to multiply.

  Attributes:
    in_features: rows of the kernel.
    features: columns of the kernel, size of the bias.
  """
  in_features: int
  features: int

  @nn.compact
  def __call__(self):
    kernel = self.param('kernel', nn.linear.default_kernel_init,
                        (self.in_features, self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,),
                      jnp.float32)
    return kernel, bias


class MlpBlock(nn.Module):
  """Dense -> GELU -> Dense along one axis, back to the input width.

  Parameters are `Dense_0/{kernel,bias}` and `Dense_1/{kernel,bias}` with
  kernels (width, mlp_dim) and (mlp_dim, width), whichever axis is mixed.

  Attributes:
    mlp_dim: hidden width.
    gelu_approximate: tanh GELU (as the official weights were trained) when
      True, exact erf GELU (PyTorch/timm) when False.
    dtype: computation dtype; parameters stay float32.
    axis: -1 mixes along the last axis; 0 along the first, computed as
      kernel^T @ x on x viewed as (width, everything else), so the caller
      needs no transpose (how token mixing runs on tokens-major activations).
  """
  mlp_dim: int
  gelu_approximate: bool = True
  dtype: Any = jnp.float32
  axis: int = -1

  @nn.compact
  def __call__(self, x):
    if self.axis not in (0, -1):
      raise ValueError(f'MlpBlock axis must be 0 or -1, got {self.axis}.')
    width = x.shape[self.axis]
    k0, b0 = DenseParams(width, self.mlp_dim, name='Dense_0')()
    k1, b1 = DenseParams(self.mlp_dim, width, name='Dense_1')()
    k0, b0, k1, b1, x2 = (a.astype(self.dtype) for a in (k0, b0, k1, b1, x))
    # Every product below is a plain 2-D matmul over contiguous memory.
    if self.axis == -1:
      x2 = x2.reshape(-1, width)
      y = _bias_gelu(x2 @ k0, b0[None, :], self.gelu_approximate)
      return (y @ k1 + b1[None, :]).reshape(x.shape)
    x2 = x2.reshape(width, -1)
    y = _bias_gelu(k0.T @ x2, b0[:, None], self.gelu_approximate)
    return (k1.T @ y + b1[:, None]).reshape(x.shape)


class MixerBlock(nn.Module):
  """One token-mixing and one channel-mixing MLP, each with its own LayerNorm.

  Attributes:
    tokens_mlp_dim: hidden width of the token-mixing MLP (D_S).
    channels_mlp_dim: hidden width of the channel-mixing MLP (D_C).
    stochastic_depth: probability of dropping each residual branch per
      example while training. As in big_vision, kept branches are not
      rescaled by 1/(1-p), so the paper's rate (0.1) means what it meant there.
    gelu_approximate: see `MlpBlock`.
    dtype: computation dtype.
    tokens_major: input layout. False: (batch, tokens, channels), the
      paper's. True: (tokens, batch, channels), which `MlpMixer` uses inside
      so that token mixing needs no transposes (see `MlpMixer`).
  """
  tokens_mlp_dim: int
  channels_mlp_dim: int
  stochastic_depth: float = 0.0
  gelu_approximate: bool = True
  dtype: Any = jnp.float32
  tokens_major: bool = False

  def _keep_mask(self, x, train):
    """Per-example 0/1 multiplier for a residual branch, or 1 if inactive."""
    # Inference, a zero rate, or no 'dropout' rng: the branch is always kept.
    if (not train or self.stochastic_depth <= 0.0 or
        not self.has_rng('dropout')):
      return 1.0
    # x is (tokens, batch, channels) here; one draw per example.
    drop = jax.random.bernoulli(
        self.make_rng('dropout'), self.stochastic_depth, (1, x.shape[1], 1))
    return 1.0 - drop.astype(x.dtype)

  @nn.compact
  def __call__(self, x, *, train=False):
    if not self.tokens_major:
      x = jnp.swapaxes(x, 0, 1)
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='LayerNorm_0')(x)
    y = MlpBlock(self.tokens_mlp_dim, self.gelu_approximate, self.dtype,
                 axis=0, name='token_mixing')(y)
    x = x + y * self._keep_mask(x, train)
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='LayerNorm_1')(x)
    y = MlpBlock(self.channels_mlp_dim, self.gelu_approximate, self.dtype,
                 name='channel_mixing')(y)
    x = x + y * self._keep_mask(x, train)
    return x if self.tokens_major else jnp.swapaxes(x, 0, 1)


class PatchStem(nn.Module):
  """Per-patch linear projection: what the stride-P, P x P convolution does.

  Parameters `kernel` (P, P, 3, C) and `bias` (C,) have the names, shapes and
  initialisers of the official `nn.Conv` stem, so checkpoints load unchanged;
  computing it as one matmul over flattened patches avoids the convolution
  (and, when training, its kernel-gradient convolution and input transposes).

  Attributes:
    hidden_dim: output channels C.
    patch_size: P.
    dtype: computation dtype.
  """
  hidden_dim: int
  patch_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    """Returns (tokens, batch, C) with the tokens in row-major patch order."""
    batch, height, width, chans = images.shape
    p = self.patch_size
    rows, cols = height // p, width // p
    kernel = self.param('kernel', nn.linear.default_kernel_init,
                        (p, p, chans, self.hidden_dim), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros_init(),
                      (self.hidden_dim,), jnp.float32)
    x = images.astype(self.dtype).reshape(batch, rows, p, cols, p, chans)
    # (row, col, batch, p, p, chans): patch pixels flatten in the kernel's
    # (kh, kw, cin) order.
    x = x.transpose(1, 3, 0, 2, 4, 5).reshape(rows * cols * batch, -1)
    x = x @ kernel.astype(self.dtype).reshape(-1, self.hidden_dim)
    x = x + bias.astype(self.dtype)
    return x.reshape(rows * cols, batch, self.hidden_dim)


class MlpMixer(nn.Module):
  """The MLP-Mixer classifier.

  Input: NHWC float images scaled to [-1, 1], height and width divisible by
  `patch_size`. Output: float32 logits (batch, num_classes), or the pooled
  (batch, hidden_dim) features when `num_classes` is None or 0.

  The function is the paper's; the layout is chosen for speed. Activations
  are kept tokens-major, (tokens, batch, channels): channel mixing is then a
  matmul over (tokens * batch, channels) and token mixing a matmul of the
  transposed (small) kernel with (tokens, batch * channels), so no
  activation is transposed inside the blocks, forward or backward (only the
  input images, once, into patches). The stem is the patch matmul that its
  stride-P convolution amounts to. GELU and its bias run as
  one function whose backward recomputes the activation rather than storing
  it (a `jax.custom_vjp`: reverse-mode gradients only, so no `jax.jvp` or
  `jax.hessian` through the model). `reference_model.py` is the plain
  version the tests compare this one with.

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

  @nn.compact
  def __call__(self, images, *, train=False):
    if images.ndim != 4:
      raise ValueError(f'Expected NHWC images, got shape {images.shape}.')
    height, width = images.shape[1:3]
    if height % self.patch_size or width % self.patch_size:
      raise ValueError(
          f'Image size {height}x{width} is not divisible by the patch size '
          f'{self.patch_size}; resize or crop the images to a multiple of it.')
    x = PatchStem(self.hidden_dim, self.patch_size, self.dtype,
                  name='stem')(images)
    for i in range(self.num_blocks):
      rate = self.stochastic_depth * i / max(self.num_blocks - 1, 1)
      x = MixerBlock(self.tokens_mlp_dim, self.channels_mlp_dim, rate,
                     self.gelu_approximate, self.dtype, tokens_major=True,
                     name=f'MixerBlock_{i}')(x, train=train)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype,
                     name='pre_head_layer_norm')(x)
    x = jnp.mean(x.astype(jnp.float32), axis=0)  # Over tokens.
    if not self.num_classes:
      return x
    return nn.Dense(self.num_classes, dtype=jnp.float32, name='head',
                    kernel_init=nn.initializers.zeros,
                    bias_init=nn.initializers.constant(self.head_bias_init))(x)


def create_model(variant: str, num_classes: Optional[int] = 1000, *,
                 dtype: Any = 'float32', **options) -> MlpMixer:
  """Returns the `MlpMixer` module for a variant name such as "B_16".

  Args:
    variant: FAMILY_PATCH, e.g. "B_16" or "S_8" (see `get_spec`).
    num_classes: head size; None or 0 returns pooled features instead.
    dtype: computation dtype, a name ("float32", "bfloat16") or a jnp dtype.
    **options: size overrides accepted by `get_spec` (`num_blocks=2`, ...)
      and module options that keep the parameter tree unchanged:
      `stochastic_depth`, `gelu_approximate`, `head_bias_init`.
  """
  size_fields = {f.name for f in dataclasses.fields(MixerSpec)}
  sizes = {k: options.pop(k) for k in list(options) if k in size_fields}
  spec = get_spec(variant, **sizes)
  allowed = {'stochastic_depth', 'gelu_approximate', 'head_bias_init'}
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
