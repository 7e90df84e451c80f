"""MLP-Mixer (Tolstikhin et al., arXiv 2105.01601) as Flax linen modules.

The module tree is the official one (vit_jax `models_mixer.py`), so a
published `.npz` maps onto `params` leaf for leaf.
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
  """Sizes of one Mixer variant (paper, Table 1): P, N, C, D_S, D_C."""
  patch_size: int
  num_blocks: int
  hidden_dim: int
  tokens_mlp_dim: int
  channels_mlp_dim: int


# The one table of model sizes (paper, Table 1): family -> N, C, D_S, D_C.
FAMILIES = {
    family: dict(num_blocks=n, hidden_dim=c, tokens_mlp_dim=d_s,
                 channels_mlp_dim=d_c)
    for family, (n, c, d_s, d_c) in {
        'S': (8, 512, 256, 2048), 'B': (12, 768, 384, 3072),
        'L': (24, 1024, 512, 4096), 'H': (32, 1280, 640, 5120)}.items()}
# Computation dtypes the model supports; parameters are always float32.
COMPUTE_DTYPES = (jnp.dtype('float32'), jnp.dtype('bfloat16'),
                  jnp.dtype('float16'))
# Module options of create_model that keep the parameter tree unchanged.
MODULE_OPTIONS = ('stochastic_depth', 'gelu_approximate', 'head_bias_init',
                  'remat')
PAPER_VARIANTS = ('S_32', 'S_16', 'S_8', 'B_32', 'B_16', 'L_32', 'L_16', 'H_14')

_VARIANT_RE = re.compile(r'^(?:Mixer-)?([SBLH])[_/](\d+)$')


def get_spec(variant: str, **overrides: int) -> MixerSpec:
  """The sizes of `variant` ("B_16", "Mixer-B_16", "B/16", any family with
  any patch), with keyword overrides of single sizes (`num_blocks=2`)."""
  match = _VARIANT_RE.match(variant)
  if match is None:
    raise ValueError(
        f'Unknown Mixer variant {variant!r}: expected FAMILY_PATCH with '
        f'FAMILY one of {sorted(FAMILIES)} and PATCH an integer, e.g. '
        f'"B_16". The paper variants are {", ".join(PAPER_VARIANTS)}.')
  fields = dict(FAMILIES[match.group(1)], patch_size=int(match.group(2)))
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
  mlp_dim: int
  gelu_approximate: bool  # See MlpMixer.
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.Dense(self.mlp_dim, dtype=self.dtype)(x)
    y = nn.gelu(y, approximate=self.gelu_approximate)
    return nn.Dense(x.shape[-1], dtype=self.dtype)(y)


class MixerBlock(nn.Module):
  """Token mixing, then channel mixing, on (batch, tokens, channels)."""
  tokens_mlp_dim: int
  channels_mlp_dim: int
  gelu_approximate: bool  # See MlpMixer.
  stochastic_depth: float = 0.0
  dtype: Any = jnp.float32

  def _keep(self, x, train):
    """Per-example 0/1 multiplier of a residual branch (stochastic depth);
    as in big_vision, kept branches are not rescaled by 1/(1-p)."""
    if (not train or self.stochastic_depth <= 0.0 or
        not self.has_rng('dropout')):
      return 1.0
    drop = jax.random.bernoulli(self.make_rng('dropout'),
                                self.stochastic_depth, (x.shape[0], 1, 1))
    return 1.0 - drop.astype(x.dtype)

  @nn.compact
  def __call__(self, x, train=False):  # Positional: nn.remat's static arg.
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
    y = MlpBlock(self.tokens_mlp_dim, self.gelu_approximate, self.dtype,
                 name='token_mixing')(jnp.swapaxes(y, 1, 2))
    x = x + jnp.swapaxes(y, 1, 2) * self._keep(x, train)
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
    y = MlpBlock(self.channels_mlp_dim, self.gelu_approximate, self.dtype,
                 name='channel_mixing')(y)
    return x + y * self._keep(x, train)


class MlpMixer(nn.Module):
  """The MLP-Mixer on NHWC images in [-1, 1]: float32 logits, or the pooled
  features when `num_classes` is None or 0. Block i of N drops its branches
  at stochastic_depth * i / (N - 1) (train=True with a 'dropout' rng)."""
  num_classes: Optional[int]
  patch_size: int
  num_blocks: int
  hidden_dim: int
  tokens_mlp_dim: int
  channels_mlp_dim: int
  stochastic_depth: float = 0.0
  # The one default of the GELU form: tanh, as the official weights were
  # trained; False: the exact (erf) form of PyTorch and timm.
  gelu_approximate: bool = True
  head_bias_init: float = 0.0  # -6.9 for the sigmoid-loss recipe.
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, images, *, train=False):
    p = self.patch_size
    if images.ndim != 4 or images.shape[1] % p or images.shape[2] % p:
      raise ValueError(
          f'Images of shape {images.shape} are not NHWC or not divisible by '
          f'the patch size {p}; resize or crop them to a multiple of it.')
    x = nn.Conv(self.hidden_dim, (p, p), strides=(p, p), padding='VALID',
                dtype=self.dtype, name='stem')(images)
    x = x.reshape(x.shape[0], -1, x.shape[-1])  # Row-major patch order.
    self.sow('intermediates', 'stem_out', x)  # 'stem' is the conv's scope.
    block = (nn.remat(MixerBlock, static_argnums=(2,)) if self.remat
             else MixerBlock)
    for i in range(self.num_blocks):
      rate = self.stochastic_depth * i / max(self.num_blocks - 1, 1)
      x = block(self.tokens_mlp_dim, self.channels_mlp_dim,
                self.gelu_approximate, rate, self.dtype,
                name=f'MixerBlock_{i}')(x, train)
      self.sow('intermediates', f'block_{i}', x)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype,
                     name='pre_head_layer_norm')(x)
    x = jnp.mean(x.astype(jnp.float32), axis=1)
    self.sow('intermediates', 'pre_logits', x)
    if not self.num_classes:
      return x
    x = nn.Dense(self.num_classes, dtype=jnp.float32, name='head',
                 kernel_init=nn.initializers.zeros,
                 bias_init=nn.initializers.constant(self.head_bias_init))(x)
    self.sow('intermediates', 'logits', x)
    return x


def intermediate_outputs(model: MlpMixer, params, images, **kwargs):
  """{'stem', 'block_0', ..., 'pre_logits'[, 'logits']: array} of a run."""
  _, state = model.apply({'params': params}, images,
                         mutable=['intermediates'], **kwargs)
  return {'stem' if name == 'stem_out' else name: values[0]
          for name, values in state['intermediates'].items()}


def create_model(variant: str, num_classes: Optional[int] = 1000, *,
                 dtype: Any = 'float32', **options) -> MlpMixer:
  """The `MlpMixer` of `variant` ("B_16", see `get_spec`); `options` are
  size overrides (`num_blocks=2`) and the `MODULE_OPTIONS`."""
  sizes = {k: options.pop(k) for k in MixerSpec.__annotations__
           if k in options}
  spec = get_spec(variant, **sizes)
  unknown = set(options) - set(MODULE_OPTIONS)
  if unknown:
    raise TypeError(f'create_model got unknown option(s) {sorted(unknown)}; '
                    f'valid: {sorted(MODULE_OPTIONS)}, "dtype" and sizes.')
  if not 0.0 <= options.get('stochastic_depth', 0.0) < 1.0:
    raise ValueError(f'stochastic_depth={options["stochastic_depth"]} must '
                     'be in [0, 1).')
  if not isinstance(options.get('gelu_approximate', True), bool):
    raise TypeError('gelu_approximate must be True (tanh GELU, official) or '
                    'False (exact GELU, timm).')
  try:
    dtype = jnp.dtype(dtype)
  except TypeError:
    pass  # Not a dtype name: refused below.
  if dtype not in COMPUTE_DTYPES:
    raise ValueError(f'dtype={dtype!r} is not a computation dtype of the '
                     f'model; use one of {[d.name for d in COMPUTE_DTYPES]}.')
  if num_classes is not None and (not isinstance(num_classes, (int, np.integer))
                                  or num_classes < 0):
    raise ValueError(f'num_classes={num_classes!r} must be an int >= 0 (0 or '
                     'None: no head, pooled features).')
  return MlpMixer(num_classes=num_classes, dtype=dtype,
                  **dataclasses.asdict(spec), **options)


def count_params(params) -> int:
  """Total number of scalars in a parameter tree (works on shape structs)."""
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(params)))


def flops_per_image(model: MlpMixer, image_size) -> int:
  """Forward FLOPs of one image (side or (height, width)), 2 per multiply-add
  of the matrix products only (the rest is a fraction of a percent)."""
  height, width = np.broadcast_to(image_size, (2,))
  p = model.patch_size
  if height % p or width % p:
    raise ValueError(f'image size {height}x{width} is not divisible by the '
                     f'patch size {p}.')
  tokens, c = int(height // p * (width // p)), model.hidden_dim
  block = 2 * tokens * c * (model.tokens_mlp_dim + model.channels_mlp_dim)
  macs = (tokens * p * p * 3 * c + model.num_blocks * block
          + c * (model.num_classes or 0))
  return 2 * macs


def init_params(model: MlpMixer, rng, image_size: int):
  """Initialises float32 parameters for square images of `image_size`."""
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return model.init(rng, images)['params']


def param_shapes(model: MlpMixer, image_size: int):
  """The parameter tree as `jax.ShapeDtypeStruct`s, without allocating it."""
  return jax.eval_shape(
      lambda: init_params(model, jax.random.PRNGKey(0), image_size))
