"""mixer_jax: MLP-Mixer (arXiv 2105.01601) in JAX/Flax.

Public API:
  create_model(variant, num_classes, **options) -> flax module
  count_params(params), flops_per_image(model, image_size)
"""

from mixer_jax.models import count_params
from mixer_jax.models import create_model
from mixer_jax.models import flops_per_image
from mixer_jax.models import MlpMixer
from mixer_jax.models import PAPER_VARIANTS

__version__ = '0.1.0'
