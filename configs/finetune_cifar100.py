"""Fine-tunes an official Mixer checkpoint on CIFAR-100.

  python -m mixer_jax.train --config=configs/finetune_cifar100.py --workdir=DIR

The recipe of configs/finetune_cifar10.py on `cifar100`.
"""

import os
import runpy


def get_config():
  """CIFAR-100 fine-tuning from imagenet21k/Mixer-B_16."""
  # Loaded by path, so this file works from any directory.
  recipe = runpy.run_path(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), 'finetune_cifar10.py'))
  return recipe['get_config']('cifar100')
