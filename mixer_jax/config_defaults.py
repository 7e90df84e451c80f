"""Every configuration field of mixer_jax, with its default and meaning.

The config files (configs/*.py in the repository, or a user's own) start from
`get_config()` here and override a few fields:

  from mixer_jax import config_defaults
  def get_config():
    config = config_defaults.get_config()
    config.batch_size = 64
    return config

No code in the package reads a field that is not defined in this file. The
returned ConfigDict is locked, so a misspelt field (`config.learning_rat =
5.0`) raises where it is set instead of creating a field that nothing reads;
`config.evals` (a map from names the user chooses to `eval_entry(...)`, each
locked) is the one open level. `mixer_jax.train` rejects inconsistent values
before compiling.

This file is itself a config file (the defaults), and any field can be
overridden from the command line:
  python -m mixer_jax.train --config=mixer_jax/config_defaults.py \
      --workdir=DIR --config.batch_size=64 --config.model.variant=S_16
"""

import ml_collections


def get_config():
  """Returns the default configuration (Mixer-B/16, ImageNet-1k scale)."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # Parameters, data order, stochastic depth and mixup.

  # ---------------------------------------------------------------- Model.
  config.model = ml_collections.ConfigDict()
  config.model.variant = 'B_16'  # FAMILY_PATCH: S_32 S_16 S_8 B_32 B_16 ...
  # Size overrides; None keeps the variant's value (paper Table 1).
  config.model.num_blocks = ml_collections.FieldReference(None, field_type=int)
  config.model.hidden_dim = ml_collections.FieldReference(None, field_type=int)
  config.model.tokens_mlp_dim = ml_collections.FieldReference(
      None, field_type=int)
  config.model.channels_mlp_dim = ml_collections.FieldReference(
      None, field_type=int)
  config.model.dtype = 'float32'  # Computation dtype: float32 or bfloat16.
  config.model.gelu_approximate = True  # tanh GELU, as the official weights.
  config.model.stochastic_depth = 0.0  # Rate of the last block (linear ramp).
  config.model.head_bias_init = 0.0  # -6.9 for the sigmoid ImageNet recipe.
  # Recompute each block in the backward pass instead of storing its
  # activations: about 1/3 more compute for far less memory (large variants).
  config.model.remat = False

  # Weights to start from: a registry name ("imagenet21k/Mixer-B_16"), a Hub
  # name ("hf-hub:timm/mixer_b16_224.goog_in21k[@revision]"), a path to an
  # official .npz or timm .safetensors, another run's workdir, or '' to train
  # from scratch. The head is replaced
  # (zero-initialised) when the class count differs; the token-mixing weights
  # are expanded when image_size is an integer multiple of the checkpoint's.
  config.init_from = ''

  # ------------------------------------------------------------------ Data.
  config.dataset = 'imagenet2012'  # Any TFDS name, 'digits', or 'folder'.
  config.data_dir = ml_collections.FieldReference(None, field_type=str)
  config.folder = ''  # Root of class_name/*.jpg folders when dataset=folder.
  config.train_split = 'train[:99%]'
  # Scored every eval_every_steps; it picks the best checkpoint, so it must be
  # held out of train (never the test split): here the official minival.
  config.eval_split = 'train[99%:]'
  config.num_classes = -1  # -1: read from the data set's metadata.
  config.image_size = 224
  config.shuffle_buffer = 10_000  # Examples per host (big_vision: 250k).
  config.cache = False  # Cache decoded examples in memory (small data sets).
  # Cache the raw (still encoded) training records in memory, so later epochs
  # read no files (big_vision's cache_raw; ImageNet needs ~120 GB per host).
  config.cache_raw = False
  config.prefetch_batches = 2  # Batches prefetched to the devices.
  config.bad_images = 'error'  # 'error' stops; 'skip' drops and counts them.

  config.pp = ml_collections.ConfigDict()
  # 'inception': Inception crop + flip (ImageNet pretraining);
  # 'finetune': sample_distorted_bounding_box crop + resize + flip;
  # 'resize': plain resize (no augmentation).
  config.pp.train_crop = 'inception'
  config.pp.crop_area_min = 0.05  # Smallest crop area, as a fraction.
  config.pp.flip = True
  config.pp.randaugment_layers = 2  # 0 disables RandAugment.
  config.pp.randaugment_magnitude = 15
  # Beta(alpha, alpha) mixing weight. big_vision's `mixup=dict(p=0.5)` is
  # this concentration (0.5), applied to every batch: mixup_prob = 1.0.
  config.pp.mixup_alpha = 0.5
  config.pp.mixup_prob = 1.0  # Fraction of batches mixed; 0 disables mixup.
  # 'resize_crop': resize the short side to eval_resize, centre crop;
  # 'resize': plain resize to image_size (the fine-tuning eval);
  # 'squash_crop': resize to eval_resize square, centre crop.
  config.pp.eval_crop = 'resize_crop'
  config.pp.eval_resize = 256
  # Method of the 'resize_crop' short-side resize: 'area' (big_vision's
  # resize_small default), 'bilinear', 'bicubic' or 'nearest'.
  config.pp.eval_resize_method = 'area'

  # Further evaluations besides eval_split (which always runs and picks the
  # best checkpoint): name -> eval_entry(...) below, logged as
  # `<name>/accuracy` etc. None by default. A test split belongs here, with
  # every_steps=-1 (scored once, on the final model).
  config.evals = ml_collections.ConfigDict()

  # -------------------------------------------------------------- Training.
  config.batch_size = 4096  # Global, over all devices and hosts.
  # Where parameters and optimizer state live: 'replicate' (a copy on every
  # device) or 'fsdp' (each array split over the devices along its largest
  # divisible axis, gathered per layer by XLA; for L/16 and H/14).
  config.sharding = 'replicate'
  # fsdp leaves arrays of at most this many MiB replicated (big_vision's
  # fsdp(min_size_to_shard_mb=4)): biases and LayerNorm scales would cost a
  # collective each for next to no memory.
  config.fsdp_min_size_mb = 4.0
  # Device mesh, as big_vision's config.mesh: (axis, size) pairs, one -1 for
  # the remaining devices. (('data', -1), ('fsdp', 8)) splits parameters
  # within groups of 8 consecutive devices (a host) under sharding='fsdp' and
  # replicates them across groups; the batch is split over every axis.
  config.mesh = (('data', -1),)
  config.grad_accum_steps = 1  # Micro-batches per optimizer step.
  config.num_epochs = 300.0  # Used when num_train_steps is -1.
  config.num_train_steps = -1
  config.optimizer = 'adam'  # 'adam' or 'sgd' (momentum).
  config.learning_rate = 1e-3  # Peak, reached after the warmup.
  config.lr_schedule = 'linear'  # 'linear' or 'cosine' decay after warmup.
  config.warmup_steps = 10_000
  # Relative end of the decay (big_vision's linear_end): the schedule's
  # multiplier of learning_rate and of weight_decay at step num_train_steps,
  # one past the last update (see mixer_jax/training/optim.py). 1e-5 ends at
  # 1e-3 x 1e-5 = 1e-8 for the ImageNet recipe; 0 is the references' cosine.
  config.end_learning_rate_multiplier = 1e-5
  config.b1 = 0.9  # Adam beta1, or the SGD momentum.
  config.b2 = 0.999
  config.momentum_dtype = 'float32'  # SGD/Adam first moment: or bfloat16.
  # Decoupled weight decay on kernels only, scaled by the schedule's shape but
  # not by the learning rate (big_vision's convention): param -= wd * sched *
  # param. 1e-4 here is big_vision's `wd=1e-4`.
  config.weight_decay = 1e-4
  config.grad_clip_norm = 1.0  # Global-norm clipping; 0 disables.
  config.loss = 'sigmoid'  # 'softmax' or 'sigmoid' cross-entropy.
  config.label_smoothing = 0.0
  # Exponential moving average of the parameters, updated inside the train
  # step (ema <- d * ema + (1 - d) * params, starting from the initial
  # parameters), saved with the checkpoint and evaluated beside the model as
  # `ema/eval_*`; `--weights=ema` in predict, evaluate and export uses it.
  # 0 turns it off (no copy of the parameters is kept). timm's usual: 0.9998.
  config.ema_decay = 0.0

  # ------------------------------------------------- Logging and saving.
  config.log_every_steps = 100
  config.eval_every_steps = 2_000  # Also at the last step.
  config.checkpoint_every_steps = 2_000  # Also at the last step.
  config.keep_checkpoints = 3  # Most recent checkpoints kept...
  config.keep_best_checkpoint = True  # ...plus the best by eval accuracy.
  # -1 resumes from the newest checkpoint in workdir/checkpoints. K >= 0
  # resumes from step K instead (the fallback when the newest is damaged);
  # newer steps are moved to checkpoints.set_aside/, never deleted. It applies
  # once: the marker file workdir/resume_step_K.applied makes later starts
  # with the same flag resume from the newest checkpoint; delete the marker
  # to fall back to K again.
  config.resume_step = -1
  # A resume with another batch_size or number of training steps is refused:
  # the data position and the learning-rate schedule are counted in steps,
  # so both would change meaning. True resumes anyway (e.g. to train longer).
  config.allow_changed_schedule = False
  config.profile_steps = 0  # >0: jax.profiler trace of that many steps.
  config.profile_start_step = 10
  config.lock()
  # Eval names are the user's choice (config.evals.test = eval_entry(...));
  # the entries themselves are locked.
  config.evals.unlock()
  return config


def eval_entry(kind='classification', *, dataset='', split='',
               label_key='label', every_steps=0, crop='', resize=0,
               resize_method='', fewshot_datasets=None,
               shots=(1, 5, 10, 25), l2_reg=2.0**10, num_seeds=3):
  """One entry of config.evals; every field is in the returned ConfigDict.

  Args:
    kind: 'classification' (top-1/top-5 accuracy and loss of the model's
      head), 'real' (ImageNet ReaL: top-1 is correct when it is in the
      image's set of labels `label_key`; images with an empty set are left
      out) or 'fewshot' (linear probes on frozen pre-logits, see
      mixer_jax/training/linear_probe.py).
    dataset: TFDS name ('' = config.dataset); not used by 'fewshot'.
    split: split to score ('' = config.eval_split); not used by 'fewshot'.
    label_key: feature holding the label(s) ('real_label' for ReaL).
    every_steps: run every N training steps and at the last step
      (0 = config.eval_every_steps; -1 = only at the last step, for a figure
      reported once, such as the test split of a run that selects its
      checkpoint on eval_split).
    crop, resize, resize_method: eval preprocessing as config.pp.eval_crop,
      eval_resize, eval_resize_method ('' or 0 = the config.pp value).
    fewshot_datasets: 'fewshot' only: {name: (tfds_name, train_split,
      test_split)}.
    shots: 'fewshot': examples per class drawn from the train split.
    l2_reg: 'fewshot': the least-squares L2 regulariser (big_vision
      common_fewshot.get_fewshot_lsr: 2**10, fixed).
    num_seeds: 'fewshot': draws of the shots, each reported and averaged.
  """
  entry = ml_collections.ConfigDict()
  entry.kind = kind
  entry.dataset = dataset
  entry.split = split
  entry.label_key = label_key
  entry.every_steps = every_steps
  entry.crop = crop
  entry.resize = resize
  entry.resize_method = resize_method
  entry.fewshot_datasets = dict(fewshot_datasets or {})
  entry.shots = tuple(shots)
  entry.l2_reg = float(l2_reg)
  entry.num_seeds = num_seeds
  return entry.lock()
