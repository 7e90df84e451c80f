"""Checks a training config before anything is imported, compiled or read.

A locked ConfigDict already refuses unknown fields and values of the wrong
type; what is left are ranges, choices and consistency. `validate_config`
collects every problem and raises one `ConfigError` listing them all, each
naming the field, the value and what is allowed. It imports no JAX or
TensorFlow, so the programs run it right after reading their flags; the
device-count checks run when the trainer passes `num_devices`.

Each choice is listed here once, and the modules that act on it import it.
"""

import math
import re
from typing import List, Optional

from mixer_jax.data.preprocess_choices import EVAL_CROPS
from mixer_jax.data.preprocess_choices import RESIZE_METHODS
from mixer_jax.data.preprocess_choices import TRAIN_CROPS
from mixer_jax.errors import UserError

DTYPES = ('float32', 'bfloat16')
OPTIMIZERS = ('adam', 'sgd')
SCHEDULES = ('linear', 'cosine')
LOSSES = ('softmax', 'sigmoid')
EVAL_KINDS = ('classification', 'real', 'fewshot')
BAD_IMAGES = ('error', 'skip')
SHARDINGS = ('replicate', 'fsdp')
# FAMILY_PATCH as `models.get_spec` reads it ("B_16", "Mixer-B_16", "B/16").
VARIANT = re.compile(r'(?:Mixer-)?([SBLH])[_/](\d+)')

CHOICES = {
    'model.dtype': DTYPES, 'momentum_dtype': DTYPES, 'optimizer': OPTIMIZERS,
    'lr_schedule': SCHEDULES, 'loss': LOSSES, 'sharding': SHARDINGS,
    'bad_images': BAD_IMAGES, 'pp.train_crop': TRAIN_CROPS,
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
  """Raises `ConfigError` listing every invalid or inconsistent field.

  Args:
    config: a ConfigDict built from `mixer_jax.config_defaults.get_config()`.
    num_devices: devices of the mesh (all hosts); enables the batch check.
    num_processes: number of processes (hosts) feeding data.
  """
  problems: List[str] = []

  def get(name, node=config):
    for part in name.split('.'):
      node = node[part]
    return node

  def fail(name, value, expected):
    problems.append(f'config.{name}={value!r}: {expected}.')

  for name, allowed in CHOICES.items():
    if get(name) not in allowed:
      fail(name, get(name), f'must be one of {", ".join(allowed)}')
  for name, interval in RANGES.items():
    why = None if get(name) is None else _in_range(get(name), interval)
    if why:
      fail(name, get(name), why)

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


def _check_eval(name, entry, fail) -> None:
  """One `config_defaults.eval_entry(...)` of config.evals."""
  if not name.replace('_', '').replace('.', '').isalnum():
    fail(name, name, 'names must be letters, digits or _')
  for field, allowed in (('kind', EVAL_KINDS), ('crop', ('',) + EVAL_CROPS),
                         ('resize_method', ('',) + RESIZE_METHODS)):
    if entry[field] not in allowed:
      fail(f'{name}.{field}', entry[field],
           f'must be one of {", ".join(a or "(empty)" for a in allowed)}')
  for field, interval in EVAL_RANGES.items():
    why = _in_range(entry[field], interval)
    if why:
      fail(f'{name}.{field}', entry[field], why)
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
