"""Checks a config's ranges, choices and consistency (a locked ConfigDict
already refuses unknown fields and wrong types), before JAX or TensorFlow
is imported: one `ConfigError` lists every problem."""

import math
import re
from typing import List, Optional

from mixer_jax.data.preprocess_choices import EVAL_CROPS
from mixer_jax.data.preprocess_choices import RESIZE_METHODS
from mixer_jax.data.preprocess_choices import TRAIN_CROPS
from mixer_jax.errors import UserError

DTYPES = ('float32', 'bfloat16')
EVAL_KINDS = ('classification', 'real', 'fewshot')
# FAMILY_PATCH as `models.get_spec` reads it ("B_16", "Mixer-B_16", "B/16").
VARIANT = re.compile(r'(?:Mixer-)?([SBLH])[_/](\d+)')

CHOICES = {
    'model.dtype': DTYPES, 'momentum_dtype': DTYPES,
    'optimizer': ('adam', 'sgd'), 'lr_schedule': ('linear', 'cosine'),
    'loss': ('softmax', 'sigmoid'), 'sharding': ('replicate', 'fsdp'),
    'bad_images': ('error', 'skip'), 'pp.train_crop': TRAIN_CROPS,
    'pp.eval_crop': EVAL_CROPS, 'pp.eval_resize_method': RESIZE_METHODS,
}
# Intervals; '|-1' also allows -1 ("derive it" or "only at the end").
RANGES = {
    'seed': '[0, inf)', 'model.num_blocks': '[1, inf)',
    'model.hidden_dim': '[1, inf)', 'model.tokens_mlp_dim': '[1, inf)',
    'model.channels_mlp_dim': '[1, inf)', 'model.stochastic_depth': '[0.0, 1.0)',
    'image_size': '[1, inf)', 'num_classes': '[1, inf)|-1',
    'shuffle_buffer': '[1, inf)', 'prefetch_batches': '[0, inf)',
    'pp.crop_area_min': '(0.0, 1.0]', 'pp.randaugment_layers': '[0, inf)',
    'pp.randaugment_magnitude': '[0, 30]', 'pp.mixup_alpha': '[0.0, inf)',
    'pp.mixup_prob': '[0.0, 1.0]', 'pp.eval_resize': '[1, inf)',
    'batch_size': '[1, inf)', 'grad_accum_steps': '[1, inf)',
    'fsdp_min_size_mb': '[0.0, inf)', 'num_train_steps': '[1, inf)|-1',
    'learning_rate': '(0.0, inf)', 'warmup_steps': '[0, inf)',
    'end_learning_rate_multiplier': '[0.0, 1.0]', 'b1': '[0.0, 1.0)',
    'b2': '[0.0, 1.0)', 'weight_decay': '[0.0, inf)',
    'grad_clip_norm': '[0.0, inf)', 'label_smoothing': '[0.0, 1.0)',
    'ema_decay': '[0.0, 1.0)', 'log_every_steps': '[1, inf)',
    'eval_every_steps': '[1, inf)', 'checkpoint_every_steps': '[1, inf)',
    'keep_checkpoints': '[1, inf)', 'resume_step': '[0, inf)|-1',
    'profile_steps': '[0, inf)', 'profile_start_step': '[0, inf)',
}
EVAL_CHOICES = {'kind': EVAL_KINDS, 'crop': ('',) + EVAL_CROPS,
                'resize_method': ('',) + RESIZE_METHODS}
EVAL_RANGES = {'every_steps': '[0, inf)|-1', 'resize': '[0, inf)',
               'l2_reg': '[0.0, inf)', 'num_seeds': '[1, inf)'}


class ConfigError(UserError, ValueError):
  """A config value is out of range, not a choice, or inconsistent."""


def _in_range(value, interval: str) -> Optional[str]:
  """None if `value` lies in `interval` ('[0, 1)', '[1, inf)|-1'), else why."""
  interval, _, extra = interval.partition('|')
  low, high = (float(x) for x in interval[1:-1].split(','))
  low_text, high_text = interval[1:-1].split(', ')
  if extra and value == int(extra):
    return None
  if (isinstance(value, (int, float)) and math.isfinite(value)
      and (low < value if interval[0] == '(' else low <= value)
      and (value < high if interval[-1] == ')' else value <= high)):
    return None
  text = f'must be {">" if interval[0] == "(" else ">="} {low_text}'
  if high_text != 'inf':
    text += f' and {"<" if interval[-1] == ")" else "<="} {high_text}'
  return text + (f' (or {extra})' if extra else '')


def validate_config(config, *, num_devices: Optional[int] = None,
                    num_processes: Optional[int] = None) -> None:
  """Raises `ConfigError` listing every invalid or inconsistent field;
  `num_devices` (all hosts) and `num_processes` enable the batch checks."""
  problems: List[str] = []

  def fail(name, value, expected):
    problems.append(f'config.{name}={value!r}: {expected}.')

  _check_fields(config, '', CHOICES, RANGES, fail)
  c = config
  variant = VARIANT.fullmatch(c.model.variant)
  if not variant:
    fail('model.variant', c.model.variant, 'Unknown Mixer variant: expected '
         'FAMILY_PATCH with FAMILY one of S, B, L, H, e.g. "B_16"')
  elif c.image_size % int(variant.group(2)) and c.image_size > 0:
    patch = int(variant.group(2))
    fail('image_size', c.image_size, f'must be divisible by the patch size '
         f'{patch} of {c.model.variant}; use e.g. '
         f'{max(patch, c.image_size // patch * patch)}')
  if not c.dataset:
    fail('dataset', c.dataset, 'must name a TFDS data set, "digits" or '
         '"folder"')
  if c.dataset == 'folder' and not c.folder:
    fail('folder', c.folder, 'must be the root of class_name/*.jpg folders '
         'when dataset="folder"')
  if c.pp.eval_crop == 'resize_crop' and c.pp.eval_resize < c.image_size:
    fail('pp.eval_resize', c.pp.eval_resize, f'must be >= image_size '
         f'({c.image_size}) to centre-crop image_size pixels')
  batch, accum = c.batch_size, c.grad_accum_steps
  if batch > 0 and accum > 0 and batch % accum:
    fail('batch_size', batch, f'must be divisible by grad_accum_steps '
         f'({accum})')
  elif batch > 0 and accum > 0 and num_devices and batch % (num_devices *
                                                            accum):
    step = num_devices * accum
    fail('batch_size', batch, f'must be divisible by devices x '
         f'grad_accum_steps = {num_devices} x {accum} = {step}, so every '
         f'micro-batch splits evenly over the devices; try '
         f'{max(1, batch // step) * step}')
  if batch > 0 and num_processes and batch % num_processes:
    fail('batch_size', batch, f'must be divisible by the {num_processes} '
         'processes')
  if c.num_train_steps == -1 and not c.num_epochs > 0:
    fail('num_epochs', c.num_epochs, 'must be > 0 when num_train_steps is -1')
  if 0 < c.num_train_steps <= c.warmup_steps:
    fail('warmup_steps', c.warmup_steps, f'must be smaller than '
         f'num_train_steps ({c.num_train_steps})')
  for name, entry in c.evals.items():
    _check_eval(f'evals.{name}', entry, fail)
  if problems:
    raise ConfigError('Invalid config:\n  ' + '\n  '.join(problems) +
                      '\nFix the config file or the --config.* flags.')


def _check_fields(node, prefix, choices, ranges, fail) -> None:
  for field, allowed in choices.items():
    if node[field] not in allowed:
      fail(prefix + field, node[field],
           f'must be one of {", ".join(a or "(empty)" for a in allowed)}')
  for field, interval in ranges.items():
    why = node[field] is not None and _in_range(node[field], interval)
    if why:
      fail(prefix + field, node[field], why)


def _check_eval(name, entry, fail) -> None:
  """One `config_defaults.eval_entry(...)` of config.evals."""
  if not name.replace('_', '').replace('.', '').isalnum():
    fail(name, name, 'names must be letters, digits or _')
  _check_fields(entry, name + '.', EVAL_CHOICES, EVAL_RANGES, fail)
  if entry.kind != 'fewshot':
    return
  if not entry.fewshot_datasets:
    fail(f'{name}.fewshot_datasets', entry.fewshot_datasets,
         'must map a name to (tfds_name, train_split, test_split)')
  for key, value in entry.fewshot_datasets.items():
    if (not isinstance(value, (tuple, list)) or len(value) != 3 or
        not all(isinstance(v, str) and v for v in value)):
      fail(f'{name}.fewshot_datasets.{key}', value,
           'must be (tfds_name, train_split, test_split)')
  if not entry.shots or not all(isinstance(k, int) and k >= 1
                                for k in entry.shots):
    fail(f'{name}.shots', entry.shots, 'must be a tuple of integers >= 1')


def check_schedule(config, num_train_steps: int) -> None:
  """Checks fields that depend on the resolved number of training steps."""
  if config.warmup_steps >= num_train_steps:
    raise ConfigError(
        f'Invalid config:\n  config.warmup_steps={config.warmup_steps!r}: '
        f'must be smaller than the {num_train_steps} training steps '
        '(from num_epochs); lower it or train longer.')
