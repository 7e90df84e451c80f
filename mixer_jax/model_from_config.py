"""The one place `config.model` becomes a module, so that a run, a restored
workdir and the benchmarks build the same Mixer."""


from mixer_jax import models


def create_model(config, num_classes: int) -> models.MlpMixer:
  """The Mixer described by `config.model` with `num_classes` outputs."""
  m = config.model
  return models.create_model(
      m.variant, num_classes, dtype=m.dtype, num_blocks=m.num_blocks,
      hidden_dim=m.hidden_dim, tokens_mlp_dim=m.tokens_mlp_dim,
      channels_mlp_dim=m.channels_mlp_dim, stochastic_depth=m.stochastic_depth,
      gelu_approximate=m.gelu_approximate, head_bias_init=m.head_bias_init,
      remat=m.remat)
