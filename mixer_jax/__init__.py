"""mixer_jax: MLP-Mixer (arXiv 2105.01601) in JAX/Flax.

Public API:
  create_model(variant, num_classes, **options) -> flax module
  load_pretrained(name_or_path, *, num_classes=None, image_size=None)
      -> (model, params)
  export_official(params, path)
  count_params(params), flops_per_image(model, image_size)
  intermediate_outputs(model, params, images) -> {'stem', 'block_i', ...}
"""

from mixer_jax.version import __version__
from mixer_jax.models import count_params
from mixer_jax.models import create_model
from mixer_jax.models import flops_per_image
from mixer_jax.models import intermediate_outputs
from mixer_jax.models import MlpMixer
from mixer_jax.models import PAPER_VARIANTS
from mixer_jax.weights.pretrained import expand_token_mixing
from mixer_jax.weights.pretrained import export_official
from mixer_jax.weights.pretrained import load_pretrained
