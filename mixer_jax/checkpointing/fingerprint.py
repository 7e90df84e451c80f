"""The model fingerprint stored with every checkpoint step."""

import dataclasses

from mixer_jax import models


def model_fingerprint(config, num_classes: int) -> dict:
  """What a checkpoint must share with `config` to be resumed or evaluated.

  The architecture, including what changes the computation but not the
  shapes (gelu_approximate); not the training hyperparameters, which may
  change between restarts. `num_classes` is the resolved count.
  """
  model = config.model
  spec = models.get_spec(
      model.variant, num_blocks=model.num_blocks, hidden_dim=model.hidden_dim,
      tokens_mlp_dim=model.tokens_mlp_dim,
      channels_mlp_dim=model.channels_mlp_dim)
  return {**dataclasses.asdict(spec),
          'gelu_approximate': bool(model.gelu_approximate),
          'image_size': int(config.image_size),
          'num_classes': int(num_classes)}
