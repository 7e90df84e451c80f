"""mixer_jax: MLP-Mixer (arXiv 2105.01601) in JAX/Flax.

Public API:
  create_model(variant, num_classes, **options) -> flax module
  load_pretrained(name_or_path, *, num_classes=None, image_size=None)
      -> (model, params)
  export_official(params, path)
  count_params(params), flops_per_image(model, image_size)
  intermediate_outputs(model, params, images) -> {'stem', 'block_i', ...}

The names are imported on first use (PEP 562), so that the programs read
their flags and config before JAX is loaded.
"""

import importlib

from mixer_jax.version import __version__

_API = {
    'count_params': 'mixer_jax.models', 'create_model': 'mixer_jax.models',
    'flops_per_image': 'mixer_jax.models',
    'intermediate_outputs': 'mixer_jax.models', 'MlpMixer': 'mixer_jax.models',
    'PAPER_VARIANTS': 'mixer_jax.models',
    'expand_token_mixing': 'mixer_jax.weights.pretrained',
    'export_official': 'mixer_jax.weights.pretrained',
    'load_pretrained': 'mixer_jax.weights.pretrained',
}
__all__ = ['__version__', *_API]


def __getattr__(name):
  if name not in _API:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  return getattr(importlib.import_module(_API[name]), name)
