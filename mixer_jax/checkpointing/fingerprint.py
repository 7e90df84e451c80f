"""The model fingerprint stored with every checkpoint step."""

import dataclasses

from mixer_jax import models


def model_fingerprint(config, num_classes: int) -> dict:
  """What a checkpoint must share with `config` to be resumed or evaluated:
  the architecture, gelu_approximate too (it changes the computation, not
  the shapes), not the hyperparameters, which may change between restarts.
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
