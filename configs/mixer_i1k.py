"""Mixer on ImageNet-1k from scratch: the paper's recipe (big_vision's).

  python -m mixer_jax.train --config=configs/mixer_i1k.py:B_16 --workdir=DIR

The shared base of b16.py, s16.py, b32.py, l16.py, ...: Adam (0.9, 0.999),
peak learning rate 1e-3 with 10k linear warmup steps then linear decay to
1e-5, decoupled weight decay 1e-4 on kernels (big_vision's convention),
global-norm clipping at 1, batch 4096, 300 epochs, stochastic depth 0.1,
Inception crop + flip + RandAugment(2, 15) + mixup (Beta(0.5, 0.5) on
every batch), sigmoid cross-entropy with the head bias at -6.9, eval on the
1% minival held out of train.
Mixer-B/16 reaches 76.4% top-1 on the ImageNet validation set in the paper.
Most of these values are already common.py's defaults; they are set here
again so the recipe reads in one place.
"""

import os
import sys

try:
  from configs import common  # pylint: disable=g-import-not-at-top
except ImportError:  # Loaded by path from outside the repository root.
  sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import common  # pylint: disable=g-import-not-at-top


def get_config(variant: str = 'B_16'):
  """The ImageNet-1k recipe for `variant` (e.g. 'B_16', 'S_16', 'L_16')."""
  config = common.get_config()
  config.model.variant = variant
  config.model.stochastic_depth = 0.1
  config.model.head_bias_init = -6.9  # About log(1/1000): sigmoid prior.
  config.model.dtype = 'bfloat16'  # Accelerators; parameters stay float32.

  config.dataset = 'imagenet2012'
  config.train_split = 'train[:99%]'
  config.eval_split = 'train[99%:]'  # Minival; 'validation' for the report.
  config.image_size = 224
  config.pp.train_crop = 'inception'
  config.pp.flip = True
  config.pp.randaugment_layers = 2
  config.pp.randaugment_magnitude = 15
  config.pp.mixup_alpha = 0.5  # big_vision's mixup p=0.5, on every batch.
  config.pp.mixup_prob = 1.0
  config.pp.eval_crop = 'resize_crop'
  config.pp.eval_resize = 256

  config.batch_size = 4096
  config.num_epochs = 300.0
  config.num_train_steps = -1
  config.optimizer = 'adam'
  config.learning_rate = 1e-3
  config.lr_schedule = 'linear'
  config.warmup_steps = 10_000
  config.end_learning_rate = 1e-5
  config.b1, config.b2 = 0.9, 0.999
  config.weight_decay = 1e-4
  config.grad_clip_norm = 1.0
  config.loss = 'sigmoid'
  return config
