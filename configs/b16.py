"""Mixer-B/16 on ImageNet-1k from scratch, the paper's recipe.

  python -m mixer_jax.train --config=configs/b16.py --workdir=DIR \\
      --config.data_dir=TFDS_DIR  # imagenet2012 prepared (manual download)

configs/mixer_i1k.py:B_16 (big_vision's mlp_mixer_i1k recipe).
"""

import os
import runpy


def get_config():
  """Mixer-B/16, ImageNet-1k, 300 epochs."""
  # Loaded by path, so this file works from any directory.
  recipe = runpy.run_path(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), 'mixer_i1k.py'))
  return recipe['get_config']('B_16')
