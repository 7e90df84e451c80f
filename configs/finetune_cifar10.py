"""Fine-tunes an official Mixer checkpoint on CIFAR-10 (the official recipe).

  python -m mixer_jax.train --config=configs/finetune_cifar10.py \
      --workdir=DIR [--config.init_from=imagenet1k/Mixer-B_16]

The vision_transformer repository's fine-tuning recipe (docs/recipes.md).
Paper: Mixer-B/16 pretrained on ImageNet-21k reaches 96.82% (ImageNet-1k
checkpoint: 96.72%).
"""

from mixer_jax import config_defaults


def get_config(dataset: str = 'cifar10'):
  """Fine-tuning recipe for a TFDS data set with train/test splits."""
  config = config_defaults.get_config()
  config.init_from = 'imagenet21k/Mixer-B_16'
  config.model.variant = 'B_16'
  config.model.stochastic_depth = 0.0
  config.model.head_bias_init = 0.0

  config.dataset = dataset
  # vit_jax's splits: train on train[:98%]; the 2% held out (1,000 CIFAR
  # images) is the eval_split that picks the best checkpoint.
  config.train_split = 'train[:98%]'
  config.eval_split = 'train[98%:]'
  # The test split: scored once, on the final model (test/accuracy).
  config.evals.test = config_defaults.eval_entry(split='test', every_steps=-1)
  config.image_size = 224
  # vit_jax's 50,000: all of CIFAR's 49,000 training images, a full shuffle.
  config.shuffle_buffer = 50_000
  config.pp.train_crop = 'finetune'
  config.pp.crop_area_min = 0.05
  config.pp.flip = True
  config.pp.randaugment_layers = 0
  config.pp.mixup_prob = 0.0
  config.pp.eval_crop = 'resize'

  config.batch_size = 512
  config.grad_accum_steps = 8
  config.num_train_steps = 10_000
  config.optimizer = 'sgd'
  config.b1 = 0.9  # Momentum.
  config.momentum_dtype = 'bfloat16'
  config.learning_rate = 0.03
  config.lr_schedule = 'cosine'
  config.warmup_steps = 500
  config.end_learning_rate_multiplier = 0.0  # vit_jax's cosine ends at 0.
  config.weight_decay = 0.0
  config.grad_clip_norm = 1.0
  config.loss = 'softmax'
  config.label_smoothing = 0.0

  config.log_every_steps = 50
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 1_000
  return config
