"""Fine-tunes an official Mixer checkpoint on CIFAR-100.

  python -m mixer_jax.train --config=configs/finetune_cifar100.py --workdir=DIR

The CIFAR-10 recipe of configs/finetune_cifar10.py (SGD momentum 0.9, lr
0.03, 500 warmup steps + cosine, batch 512 in 8 micro-batches, 10k steps at
224) on `cifar100`, with a 100-class zero head.
"""

import os
import sys

try:
  from configs import finetune_cifar10  # pylint: disable=g-import-not-at-top
except ImportError:  # Loaded by path from outside the repository root.
  sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import finetune_cifar10  # pylint: disable=g-import-not-at-top


def get_config():
  """CIFAR-100 fine-tuning from imagenet21k/Mixer-B_16."""
  return finetune_cifar10.get_config('cifar100')
