"""Mixer-S/8 on ImageNet-1k from scratch, the paper's recipe.

  python -m mixer_jax.train --config=configs/s8.py --workdir=DIR \\
      --config.data_dir=TFDS_DIR  # imagenet2012 prepared (manual download)

All settings are those of configs/mixer_i1k.py (big_vision's
mlp_mixer_i1k recipe: 300 epochs of batch 4096, RandAugment(2, 15), mixup,
evals on minival, validation, ImageNet-V2, ReaL and few-shot probes) with
model.variant = 'S_8'.
No result for S/8 with this recipe is recorded in this repository
(the paper's i1k number is for B/16, 76.44%). Hardware: 784 tokens per
image, about as much compute per image as B/16 (TPU v3-128 class).
README.md ("The ImageNet-1k recipe") lists what still differs.
"""

import os
import sys

try:
  from configs import mixer_i1k  # pylint: disable=g-import-not-at-top
except ImportError:  # Loaded by path from outside the repository root.
  sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import mixer_i1k  # pylint: disable=g-import-not-at-top


def get_config():
  """Mixer-S/8, ImageNet-1k, 300 epochs."""
  return mixer_i1k.get_config('S_8')
