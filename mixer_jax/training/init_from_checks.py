"""Checks `config.init_from` against the config's model, reading the weights.

Separate from config_validation.py, which checks a config by itself and
reads nothing: this reads (and may download) the checkpoint that
`init_from` names, to compare its architecture with the config's and to
derive the token-mixing width of a higher-resolution fine-tuning.
"""

import copy
from typing import Optional

from mixer_jax import models
from mixer_jax.training.config_validation import ConfigError
from mixer_jax.weights import official_format
from mixer_jax.weights import pretrained


def check_init_from(config) -> Optional[int]:
  """Checks that `config.init_from` fits the config's model; reads the file.

  Done before anything is compiled or written, so a wrong file fails at once.
  Every size of the checkpoint must equal the config's (the class count may
  differ: the head is replaced). An image size K times the checkpoint's
  (integer K) is a fine-tuning at higher resolution (paper, Appendix C): the
  token-mixing width must then be K^2 * D_S of the checkpoint, which is what
  a `config.model.tokens_mlp_dim` of None means.

  Args:
    config: a validated config with `init_from` set.

  Returns:
    The token-mixing width to train with: `config.model.tokens_mlp_dim`, or
    K^2 * D_S of the checkpoint when that is None.

  Raises:
    ConfigError: the checkpoint's architecture does not fit the config.
    registry.CheckpointNotFoundError, PretrainedError: unreadable file.
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
  if config.image_size % spec.patch_size:
    raise ConfigError(f'image_size={config.image_size} is not a multiple of '
                      f'the patch size {spec.patch_size}.')
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
  """The config to build the model from, checked against `config.init_from`.

  Args:
    config: a validated config.
    resuming: whether the weights come from a training checkpoint (then
      init_from is read only when the token-mixing width must be derived).

  Returns:
    `config` itself, or a copy whose `model.tokens_mlp_dim` (None in
    `config`) is set to the width `check_init_from` derives.
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
