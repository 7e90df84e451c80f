"""Checks `config.init_from` against the config's model, reading the weights.

Not in config_validation.py, which reads nothing: this reads (and may
download) the checkpoint.
"""

import copy
from typing import Optional

from mixer_jax import models
from mixer_jax.training.config_validation import ConfigError
from mixer_jax.weights import official_format
from mixer_jax.weights import pretrained


def check_init_from(config) -> Optional[int]:
  """The token-mixing width to train with; ConfigError when it does not fit.

  Every size must equal the config's but the class count (the head is
  replaced). An image size K times the checkpoint's is a fine-tuning at
  higher resolution (paper, Appendix C): the token-mixing width is then
  K^2 * D_S of the checkpoint, which `model.tokens_mlp_dim=None` means.
  """
  info = pretrained.checkpoint_info(config.init_from)
  m = config.model
  spec = models.get_spec(m.variant, num_blocks=m.num_blocks,
                         hidden_dim=m.hidden_dim,
                         channels_mlp_dim=m.channels_mlp_dim)
  what = f'config.init_from={config.init_from!r} holds {info.describe()}'
  problems = [
      f'{name}: checkpoint {got}, config {want}'
      for name, got, want in (
          ('patch_size', info.patch_size, spec.patch_size),
          ('num_blocks', info.num_blocks, spec.num_blocks),
          ('hidden_dim', info.hidden_dim, spec.hidden_dim),
          ('channels_mlp_dim', info.channels_mlp_dim, spec.channels_mlp_dim))
      if got != want]
  if problems or not info.num_tokens or not info.tokens_mlp_dim:
    raise ConfigError(
        f'{what}, which does not fit config.model (variant {m.variant}): '
        f'{"; ".join(problems) or "its architecture cannot be read"}. Set '
        'config.model.variant and the size fields to the checkpoint\'s, or '
        'choose another init_from.')
  try:
    factor = pretrained.resolution_factor(
        info.num_tokens, (config.image_size // spec.patch_size)**2,
        spec.patch_size)
  except official_format.PretrainedError as e:
    raise ConfigError(f'{what}; image_size={config.image_size}: {e}') from None
  expected = info.tokens_mlp_dim * factor**2
  if m.tokens_mlp_dim is not None and m.tokens_mlp_dim != expected:
    grown = (f' (K^2 * D_S with K={factor} for image_size='
             f'{config.image_size})' if factor > 1 else '')
    raise ConfigError(
        f'{what}: config.model.tokens_mlp_dim={m.tokens_mlp_dim} must be '
        f'{expected}{grown}. Set it to {expected} or to None (derived '
        'automatically).')
  return expected


def resolve_init_from(config, *, resuming: bool):
  """`config`, or a copy with the tokens_mlp_dim `check_init_from` derives.

  When `resuming`, init_from is read only when that width must be derived.
  """
  if not config.init_from or (resuming and
                              config.model.tokens_mlp_dim is not None):
    return config
  tokens = check_init_from(config)
  if config.model.tokens_mlp_dim is not None:
    return config
  config = copy.deepcopy(config)
  config.model.tokens_mlp_dim = tokens
  return config
