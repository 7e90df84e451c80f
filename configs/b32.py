"""Mixer-B/32 on ImageNet-1k from scratch, the paper's recipe.

  python -m mixer_jax.train --config=configs/b32.py --workdir=DIR

All settings are those of configs/mixer_i1k.py (the shared recipe) with
model.variant = 'B_32'.
"""

import os
import sys

try:
  from configs import mixer_i1k  # pylint: disable=g-import-not-at-top
except ImportError:  # Loaded by path from outside the repository root.
  sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import mixer_i1k  # pylint: disable=g-import-not-at-top


def get_config():
  """Mixer-B/32, ImageNet-1k, 300 epochs."""
  return mixer_i1k.get_config('B_32')
