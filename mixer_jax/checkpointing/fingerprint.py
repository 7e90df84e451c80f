"""The model fingerprint stored with every checkpoint step."""

import dataclasses

from mixer_jax import models


def model_fingerprint(config, num_classes: int) -> dict:
  """What a checkpoint must share with `config` to be resumed or evaluated.

  Covers the architecture (the resolved sizes, and fields that change what
  the parameters compute while keeping shapes, e.g. gelu_approximate) but not
  training hyperparameters, which may legitimately change between restarts;
  `checkpoint_checks.check_fingerprint` compares it when a step is read.

  Args:
    config: a run config (reads config.model and image_size).
    num_classes: the resolved class count (not -1).

  Returns:
    A JSON-serialisable dict.
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
