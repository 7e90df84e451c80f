"""Checks a training config before anything is compiled or downloaded.

`validate_config` collects every problem it finds and raises one
`ConfigError` listing them all, each naming the field, the bad value and
what is allowed, so a wrong flag costs seconds rather than a failed job.
"""

import math
from typing import List, Optional

from mixer_jax import models
from mixer_jax.data.preprocess_choices import EVAL_CROPS
from mixer_jax.data.preprocess_choices import RESIZE_METHODS
from mixer_jax.data.preprocess_choices import TRAIN_CROPS
from mixer_jax.training import sharding

DTYPES = ('float32', 'bfloat16')
OPTIMIZERS = ('adam', 'sgd')
SCHEDULES = ('linear', 'cosine')
LOSSES = ('softmax', 'sigmoid')
EVAL_KINDS = ('classification', 'real', 'fewshot')
BAD_IMAGES = ('error', 'skip')


class ConfigError(ValueError):
  """A config value is missing, of the wrong kind, or inconsistent."""


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


class _Checker:
  """Accumulates readable problems about fields of one config."""

  def __init__(self, config):
    self.config = config
    self.problems: List[str] = []

  def get(self, name):
    node = self.config
    for part in name.split('.'):
      if part not in node:
        self.problems.append(f'config.{name} is missing; every config must '
                             'start from configs/common.get_config().')
        return None
      node = node[part]
    return node

  def fail(self, name, value, expected):
    self.problems.append(f'config.{name}={value!r}: {expected}.')

  def enum(self, name, allowed):
    value = self.get(name)
    if value is not None and value not in allowed:
      self.fail(name, value, f'must be one of {", ".join(allowed)}')
    return value

  def integer(self, name, low=None, allow=()):
    value = self.get(name)
    if value is None or value in allow:
      return value
    if not _is_int(value) or (low is not None and value < low):
      extra = f' (or {", ".join(map(str, allow))})' if allow else ''
      self.fail(name, value, f'must be an integer >= {low}{extra}')
      return None
    return value

  def number(self, name, low=None, high=None, high_open=False):
    value = self.get(name)
    if value is None:
      return None
    bad = not _is_number(value)
    bad = bad or (low is not None and value < low)
    bad = bad or (high is not None and (value >= high if high_open
                                        else value > high))
    if bad:
      relation = '<' if high_open else '<='
      upper = '' if high is None else f' and {relation} {high}'
      lower = '' if low is None else f' >= {low}'
      self.fail(name, value, f'must be a finite number{lower}{upper}')
      return None
    return value

  def boolean(self, name):
    value = self.get(name)
    if value is not None and not isinstance(value, bool):
      self.fail(name, value, 'must be True or False')
    return value

  def string(self, name):
    value = self.get(name)
    if value is not None and not isinstance(value, str):
      self.fail(name, value, 'must be a string')
    return value


def validate_config(config, *, num_devices: Optional[int] = None,
                    num_processes: Optional[int] = None) -> None:
  """Raises `ConfigError` listing every invalid or inconsistent field.

  Args:
    config: a ConfigDict built from `configs/common.get_config()`.
    num_devices: devices of the mesh (all hosts); enables the batch check.
    num_processes: number of processes (hosts) feeding data.

  Raises:
    ConfigError: with one line per problem found.
  """
  c = _Checker(config)
  c.integer('seed', low=0)
  _check_model(c)
  c.string('init_from')
  _check_data(c)
  _check_training(c, num_devices, num_processes)
  c.integer('log_every_steps', low=1)
  c.integer('eval_every_steps', low=1)
  c.integer('checkpoint_every_steps', low=1)
  c.integer('keep_checkpoints', low=1)
  c.boolean('keep_best_checkpoint')
  c.integer('resume_step', low=0, allow=(-1,))
  c.integer('profile_steps', low=0)
  c.integer('profile_start_step', low=0)
  if c.problems:
    raise ConfigError('Invalid config:\n  ' + '\n  '.join(c.problems) +
                      '\nFix the config file or the --config.* flags.')


def _check_model(c: _Checker) -> None:
  variant = c.string('model.variant')
  sizes = {}
  for name in ('num_blocks', 'hidden_dim', 'tokens_mlp_dim',
               'channels_mlp_dim'):
    value = c.get(f'model.{name}')
    if value is not None:
      if not _is_int(value) or value < 1:
        c.fail(f'model.{name}', value, 'must be a positive integer or None')
      else:
        sizes[name] = value
  spec = None
  if isinstance(variant, str):
    try:
      spec = models.get_spec(variant, **sizes)
    except ValueError as e:
      c.problems.append(f'config.model.variant={variant!r}: {e}')
  c.enum('model.dtype', DTYPES)
  c.boolean('model.gelu_approximate')
  c.number('model.stochastic_depth', low=0.0, high=1.0, high_open=True)
  c.number('model.head_bias_init')
  c.boolean('model.remat')
  image_size = c.integer('image_size', low=1)
  if spec is not None and image_size and image_size % spec.patch_size:
    patch = spec.patch_size
    c.fail('image_size', image_size,
           f'must be divisible by the patch size {patch} of {variant}; use '
           f'e.g. {max(patch, image_size // patch * patch)}')


def _check_data(c: _Checker) -> None:
  dataset = c.string('dataset')
  if dataset == '':
    c.fail('dataset', dataset, 'must name a TFDS data set, "digits" or '
           '"folder"')
  folder = c.string('folder')
  if dataset == 'folder' and not folder:
    c.fail('folder', folder, 'must be the root of class_name/*.jpg folders '
           'when dataset="folder"')
  data_dir = c.get('data_dir')
  if data_dir is not None and not isinstance(data_dir, str):
    c.fail('data_dir', data_dir, 'must be a path or None')
  c.string('train_split')
  c.string('eval_split')
  num_classes = c.integer('num_classes', low=1, allow=(-1,))
  del num_classes
  c.integer('shuffle_buffer', low=1)
  c.boolean('cache')
  c.boolean('cache_raw')
  c.integer('prefetch_batches', low=0)
  c.enum('bad_images', BAD_IMAGES)
  c.enum('pp.train_crop', TRAIN_CROPS)
  c.number('pp.crop_area_min', low=0.0, high=1.0)
  if c.get('pp.crop_area_min') == 0:
    c.fail('pp.crop_area_min', 0, 'must be > 0')
  c.boolean('pp.flip')
  c.integer('pp.randaugment_layers', low=0)
  c.number('pp.randaugment_magnitude', low=0.0, high=30.0)
  c.number('pp.mixup_alpha', low=0.0)
  c.number('pp.mixup_prob', low=0.0, high=1.0)
  c.enum('pp.eval_crop', EVAL_CROPS)
  resize = c.integer('pp.eval_resize', low=1)
  image_size = c.get('image_size')
  if (c.get('pp.eval_crop') == 'resize_crop' and _is_int(resize)
      and _is_int(image_size) and resize < image_size):
    c.fail('pp.eval_resize', resize, f'must be >= image_size ({image_size}) '
           'to centre-crop image_size pixels')
  c.enum('pp.eval_resize_method', RESIZE_METHODS)
  _check_evals(c)


def _check_evals(c: _Checker) -> None:
  """config.evals: name -> configs/common.eval_entry(...) fields."""
  evals = c.get('evals')
  if evals is None:
    return
  for name in evals:
    if not name.replace('_', '').isalnum():
      c.fail(f'evals.{name}', name, 'names must be letters, digits or _')
    field = lambda key, name=name: f'evals.{name}.{key}'
    kind = c.enum(field('kind'), EVAL_KINDS)
    c.string(field('dataset'))
    c.string(field('split'))
    c.string(field('label_key'))
    c.integer(field('every_steps'), low=0, allow=(-1,))
    if c.get(field('crop')) != '':
      c.enum(field('crop'), EVAL_CROPS)
    c.integer(field('resize'), low=0)
    if c.get(field('resize_method')) != '':
      c.enum(field('resize_method'), RESIZE_METHODS)
    if kind != 'fewshot':
      continue
    datasets = c.get(field('fewshot_datasets'))
    if not datasets:
      c.fail(field('fewshot_datasets'), datasets,
             'must map a name to (tfds_name, train_split, test_split)')
    for key, value in (datasets or {}).items():
      if (not isinstance(value, (tuple, list)) or len(value) != 3 or
          not all(isinstance(v, str) and v for v in value)):
        c.fail(field(f'fewshot_datasets.{key}'), value,
               'must be (tfds_name, train_split, test_split)')
    shots = c.get(field('shots'))
    if (not isinstance(shots, (tuple, list)) or not shots or
        not all(_is_int(k) and k >= 1 for k in shots)):
      c.fail(field('shots'), shots, 'must be a tuple of integers >= 1')
    c.number(field('l2_reg'), low=0.0)
    c.integer(field('num_seeds'), low=1)


def _check_training(c: _Checker, num_devices, num_processes) -> None:
  batch = c.integer('batch_size', low=1)
  accum = c.integer('grad_accum_steps', low=1)
  if batch and accum and batch % accum:
    c.fail('batch_size', batch, f'must be divisible by grad_accum_steps '
           f'({accum})')
  elif batch and accum and num_devices and batch % (num_devices * accum):
    c.fail('batch_size', batch,
           f'must be divisible by devices x grad_accum_steps = {num_devices} '
           f'x {accum} = {num_devices * accum}, so every micro-batch splits '
           f'evenly over the devices; try '
           f'{max(1, batch // (num_devices * accum)) * num_devices * accum}')
  if batch and num_processes and batch % num_processes:
    c.fail('batch_size', batch, f'must be divisible by the {num_processes} '
           'processes')
  steps = c.integer('num_train_steps', low=1, allow=(-1,))
  epochs = c.get('num_epochs')
  if steps == -1 and (not _is_number(epochs) or epochs <= 0):
    c.fail('num_epochs', epochs, 'must be > 0 when num_train_steps is -1')
  c.enum('sharding', sharding.STRATEGIES)
  c.enum('optimizer', OPTIMIZERS)
  lr = c.number('learning_rate', low=0.0)
  if lr == 0:
    c.fail('learning_rate', lr, 'must be > 0')
  c.enum('lr_schedule', SCHEDULES)
  warmup = c.integer('warmup_steps', low=0)
  if _is_int(steps) and steps > 0 and _is_int(warmup) and warmup >= steps:
    c.fail('warmup_steps', warmup, f'must be smaller than num_train_steps '
           f'({steps})')
  # A multiplier of learning_rate (big_vision's relative linear_end).
  c.number('end_learning_rate_multiplier', low=0.0, high=1.0)
  c.number('b1', low=0.0, high=1.0, high_open=True)
  c.number('b2', low=0.0, high=1.0, high_open=True)
  c.enum('momentum_dtype', DTYPES)
  c.number('weight_decay', low=0.0)
  c.number('grad_clip_norm', low=0.0)
  c.enum('loss', LOSSES)
  c.number('label_smoothing', low=0.0, high=1.0, high_open=True)
  c.number('ema_decay', low=0.0, high=1.0, high_open=True)


def check_schedule(config, num_train_steps: int) -> None:
  """Checks fields that depend on the resolved number of training steps."""
  if config.warmup_steps >= num_train_steps:
    raise ConfigError(
        f'Invalid config:\n  config.warmup_steps={config.warmup_steps!r}: '
        f'must be smaller than the {num_train_steps} training steps '
        '(from num_epochs); lower it or train longer.')
