"""Every configuration field of mixer_jax, with its default and meaning.

Locked (`config.evals`, names -> `eval_entry(...)`, is the one open level),
so a misspelt field raises where it is set. This is itself a config file:

  python -m mixer_jax.train --config=mixer_jax/config_defaults.py \
      --workdir=DIR --config.batch_size=64 --config.model.variant=S_16
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config():
  """Returns the default configuration (Mixer-B/16, ImageNet-1k scale)."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # Parameters, data order, stochastic depth and mixup.

  # ---------------------------------------------------------------- Model.
  config.model = ml_collections.ConfigDict()
  config.model.variant = 'B_16'  # FAMILY_PATCH: S_32 S_16 S_8 B_32 B_16 ...
  # Size overrides; None keeps the variant's value (paper Table 1).
  config.model.num_blocks = placeholder(int)
  config.model.hidden_dim = placeholder(int)
  config.model.tokens_mlp_dim = placeholder(int)
  config.model.channels_mlp_dim = placeholder(int)
  config.model.dtype = 'float32'  # Computation dtype: float32 or bfloat16.
  config.model.gelu_approximate = True  # tanh GELU, as the official weights.
  config.model.stochastic_depth = 0.0  # Rate of the last block (linear ramp).
  config.model.head_bias_init = 0.0  # -6.9 for the sigmoid ImageNet recipe.
  config.model.remat = False  # Recompute blocks in backward: less memory.

  # Weights to start from (any `any_checkpoint.load` name or path; '': from
  # scratch). Another class count gets a zero head; an integer multiple of
  # the checkpoint's image_size expands the token mixing.
  config.init_from = ''

  # ------------------------------------------------------------------ Data.
  config.dataset = 'imagenet2012'  # Any TFDS name, 'digits', or 'folder'.
  config.data_dir = placeholder(str)
  config.folder = ''  # Root of class_name/*.jpg folders when dataset=folder.
  config.train_split = 'train[:99%]'
  # Picks the best checkpoint: held out of train, never the test split.
  config.eval_split = 'train[99%:]'  # The official minival.
  config.num_classes = -1  # -1: read from the data set's metadata.
  config.image_size = 224
  config.shuffle_buffer = 10_000  # Examples per host (big_vision: 250k).
  config.cache = False  # Cache decoded examples in memory (small data sets).
  config.cache_raw = False  # Cache encoded records (ImageNet: 120 GB/host).
  config.prefetch_batches = 2  # Batches prefetched to the devices.
  config.bad_images = 'error'  # 'error' stops; 'skip' drops and counts them.

  config.pp = ml_collections.ConfigDict()
  config.pp.train_crop = 'inception'  # Or 'finetune', 'resize' (see pp).
  config.pp.crop_area_min = 0.05  # Smallest crop area, as a fraction.
  config.pp.flip = True
  config.pp.randaugment_layers = 2  # 0 disables RandAugment.
  config.pp.randaugment_magnitude = 15
  config.pp.mixup_alpha = 0.5  # Beta(a, a); big_vision's mixup p=0.5.
  config.pp.mixup_prob = 1.0  # Fraction of batches mixed; 0 disables mixup.
  # See preprocess_choices.EVAL_CROPS and RESIZE_METHODS.
  config.pp.eval_crop = 'resize_crop'
  config.pp.eval_resize = 256
  config.pp.eval_resize_method = 'area'  # big_vision's resize_small.

  # Further evaluations, name -> eval_entry(...), logged as <name>/accuracy;
  # a test split belongs here with every_steps=-1 (the final model only).
  config.evals = ml_collections.ConfigDict()

  # -------------------------------------------------------------- Training.
  config.batch_size = 4096  # Global, over all devices and hosts.
  # 'replicate' (parameters and optimizer state on every device) or 'fsdp'
  # (each array split along its largest divisible axis; docs/parallelism.md).
  config.sharding = 'replicate'
  config.fsdp_min_size_mb = 4.0  # Smaller arrays stay replicated.
  # (axis, size) pairs, one -1 for the rest, as big_vision's config.mesh:
  # (('data', -1), ('fsdp', 8)) shards parameters within groups of 8.
  config.mesh = (('data', -1),)
  config.grad_accum_steps = 1  # Micro-batches per optimizer step.
  config.num_epochs = 300.0  # Used when num_train_steps is -1.
  config.num_train_steps = -1
  config.optimizer = 'adam'  # 'adam' or 'sgd' (momentum).
  config.learning_rate = 1e-3  # Peak, reached after the warmup.
  config.lr_schedule = 'linear'  # 'linear' or 'cosine' decay after warmup.
  config.warmup_steps = 10_000
  # The schedule's multiplier at num_train_steps (big_vision's linear_end).
  config.end_learning_rate_multiplier = 1e-5
  config.b1 = 0.9  # Adam beta1, or the SGD momentum.
  config.b2 = 0.999
  config.momentum_dtype = 'float32'  # SGD/Adam first moment: or bfloat16.
  # Decoupled, kernels only, times the schedule but not the learning rate
  # (big_vision's wd): param -= wd * sched * param.
  config.weight_decay = 1e-4
  config.grad_clip_norm = 1.0  # Global-norm clipping; 0 disables.
  config.loss = 'sigmoid'  # 'softmax' or 'sigmoid' cross-entropy.
  config.label_smoothing = 0.0
  # EMA of the parameters (ema <- d * ema + (1 - d) * params), checkpointed
  # and evaluated as ema/eval_*; --weights=ema uses it. 0: off.
  config.ema_decay = 0.0

  # ------------------------------------------------- Logging and saving.
  config.log_every_steps = 100
  config.eval_every_steps = 2_000  # Also at the last step.
  config.checkpoint_every_steps = 2_000  # Also at the last step.
  config.keep_checkpoints = 3  # Most recent checkpoints kept...
  config.keep_best_checkpoint = True  # ...plus the best by eval accuracy.
  # K >= 0: resume from step K once (newer steps set aside; see
  # docs/reliability.md); -1: from the newest.
  config.resume_step = -1
  # Resume despite another batch_size or step count (e.g. to train longer).
  config.allow_changed_schedule = False
  config.profile_steps = 0  # >0: jax.profiler trace of that many steps.
  config.profile_start_step = 10
  config.lock()
  config.evals.unlock()  # Names are the user's; each entry is locked.
  return config


def eval_entry(kind='classification', *, dataset='', split='',
               label_key='label', every_steps=0, crop='', resize=0,
               resize_method='', fewshot_datasets=None,
               shots=(1, 5, 10, 25), l2_reg=2.0**10, num_seeds=3):
  """One locked entry of config.evals (docs/recipes.md lists the kinds).

  kind: 'classification', 'real' (ImageNet ReaL, labels in `label_key`) or
  'fewshot' (linear probes: `fewshot_datasets` {name: (tfds_name,
  train_split, test_split)}, `shots`, `l2_reg`, `num_seeds`). '' or 0 takes
  config's dataset, eval_split, eval_every_steps and pp.eval_* values;
  every_steps=-1 runs only at the last step.
  """
  return ml_collections.ConfigDict(dict(
      kind=kind, dataset=dataset, split=split, label_key=label_key,
      every_steps=every_steps, crop=crop, resize=resize,
      resize_method=resize_method,
      fewshot_datasets=dict(fewshot_datasets or {}), shots=tuple(shots),
      l2_reg=float(l2_reg), num_seeds=num_seeds)).lock()
