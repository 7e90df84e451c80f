"""Tests of configs/*.py and mixer_jax.training.config_validation."""

import glob
import importlib.util
import os
import subprocess
import sys
import time

import pytest

from mixer_jax.training import config_validation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py')))


def load(name, *args):
  path = os.path.join(ROOT, 'configs', f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'_cfg_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


def load_common_module():
  path = os.path.join(ROOT, 'configs', 'common.py')
  spec = importlib.util.spec_from_file_location('_cfg_common_module', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def flat_keys(config, prefix=''):
  keys = set()
  for key, value in config.items():
    if hasattr(value, 'items'):
      keys |= flat_keys(value, f'{prefix}{key}.')
    else:
      keys.add(prefix + key)
  return keys


def test_every_config_is_found():
  names = {os.path.basename(p)[:-3] for p in CONFIG_FILES}
  assert {'common', 'quickstart', 'b16', 'mixer_i1k',
          'finetune_cifar10'} <= names


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_config_is_valid_and_defines_only_common_fields(path):
  name = os.path.basename(path)[:-3]
  config = load(name)
  config_validation.validate_config(config, num_devices=8, num_processes=2)
  # config.evals entries are named by each config; their fields must be
  # exactly those of common.eval_entry (fewshot_datasets names are free).
  entry_fields = set(load_common_module().eval_entry().keys())
  for entry_name, entry in config.get('evals', {}).items():
    assert set(entry.keys()) == entry_fields, (name, entry_name)
  extra = {k for k in flat_keys(config) - flat_keys(load('common'))
           if not k.startswith('evals.')}
  assert not extra, f'{name} sets fields missing from common.py: {extra}'


def test_b16_is_the_paper_recipe():
  c = load('b16')
  assert c.model.variant == 'B_16'
  assert (c.optimizer, c.learning_rate, c.b1, c.b2) == ('adam', 1e-3, 0.9,
                                                        0.999)
  assert (c.weight_decay, c.grad_clip_norm) == (1e-4, 1.0)
  assert (c.warmup_steps, c.lr_schedule) == (10_000, 'linear')
  assert (c.batch_size, c.num_epochs, c.num_train_steps) == (4096, 300.0, -1)
  assert (c.model.stochastic_depth, c.model.head_bias_init) == (0.1, -6.9)
  assert c.loss == 'sigmoid' and c.pp.randaugment_layers == 2
  assert c.pp.mixup_prob > 0 and c.dataset == 'imagenet2012'


@pytest.mark.parametrize('variant', ['S_32', 'S_16', 'S_8', 'B_32', 'B_16',
                                     'L_32', 'L_16', 'H_14'])
def test_every_paper_variant_shares_the_recipe(variant):
  config, base = load('mixer_i1k', variant), load('b16')
  assert config.model.variant == variant
  config_validation.validate_config(config, num_devices=8, num_processes=2)
  base.model.variant = variant
  assert config.to_dict() == base.to_dict()


def test_finetune_cifar10_is_the_official_recipe():
  c = load('finetune_cifar10')
  assert (c.optimizer, c.b1, c.learning_rate) == ('sgd', 0.9, 0.03)
  assert (c.lr_schedule, c.warmup_steps, c.num_train_steps) == ('cosine', 500,
                                                                10_000)
  assert (c.batch_size, c.grad_accum_steps, c.image_size) == (512, 8, 224)
  assert (c.grad_clip_norm, c.weight_decay, c.loss) == (1.0, 0.0, 'softmax')
  assert c.dataset == 'cifar10' and c.init_from.endswith('Mixer-B_16')
  assert c.pp.train_crop == 'finetune' and c.pp.eval_crop == 'resize'


def expect_problems(config, *fragments, **kwargs):
  with pytest.raises(config_validation.ConfigError) as info:
    config_validation.validate_config(config, **kwargs)
  message = str(info.value)
  for fragment in fragments:
    assert fragment in message, message
  return message


def test_batch_not_divisible_by_devices_times_accumulation():
  config = load('quickstart')
  config.batch_size, config.grad_accum_steps = 72, 2
  message = expect_problems(config, 'config.batch_size=72',
                            '8 x 2 = 16', num_devices=8)
  assert 'try 64' in message


def test_image_size_not_divisible_by_patch():
  config = load('quickstart')
  config.model.variant, config.image_size = 'S_16', 200
  expect_problems(config, 'config.image_size=200', 'patch size 16')


@pytest.mark.parametrize('field, value, fragment', [
    ('optimizer', 'adamw', 'must be one of adam, sgd'),
    ('loss', 'hinge', 'must be one of softmax, sigmoid'),
    ('lr_schedule', 'step', 'must be one of linear, cosine'),
    ('model.variant', 'X_16', 'Unknown Mixer variant'),
    ('model.dtype', 'float16', 'float32, bfloat16'),
    ('learning_rate', -1.0, '>= 0.0'),
    ('label_smoothing', 1.0, '< 1.0'),
    ('grad_accum_steps', 0, '>= 1'),
    ('warmup_steps', 5_000, 'smaller than num_train_steps'),
    ('eval_every_steps', 0, '>= 1'),
    ('num_classes', 0, 'or -1'),
    ('pp.train_crop', 'random', 'inception, finetune, resize'),
    ('model.stochastic_depth', 1.0, '< 1.0'),
])
def test_bad_values_are_named(field, value, fragment):
  config = load('quickstart')
  *parents, leaf = field.split('.')
  node = config
  for parent in parents:
    node = node[parent]
  node[leaf] = value
  message = expect_problems(config, f'config.{field}', fragment)
  assert message.count('\n  ') == 1, message  # Exactly one problem.


def test_all_problems_are_reported_at_once():
  config = load('quickstart')
  config.optimizer, config.loss, config.b1 = 'rmsprop', 'l2', 1.5
  message = expect_problems(config, 'config.optimizer', 'config.loss',
                            'config.b1')
  assert message.count('\n  ') == 3


def test_num_epochs_needed_without_steps():
  config = load('quickstart')
  config.num_train_steps, config.num_epochs = -1, 0.0
  expect_problems(config, 'config.num_epochs')
  with pytest.raises(config_validation.ConfigError, match='from num_epochs'):
    config_validation.check_schedule(config.unlock(), 50)


def run_train_cli(tmp_path, *flags):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  start = time.time()
  result = subprocess.run(
      [sys.executable, '-m', 'mixer_jax.train',
       '--config=configs/quickstart.py', f'--workdir={tmp_path}', *flags],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  return result, time.time() - start


def test_command_line_rejects_bad_values_before_compiling(tmp_path):
  result, _ = run_train_cli(tmp_path, '--config.optimizer=adamw',
                            '--config.batch_size=36')
  assert result.returncode != 0
  assert 'config.optimizer=\'adamw\'' in result.stderr, result.stderr[-2000:]
  assert 'config.batch_size=36' in result.stderr
  assert not os.path.exists(os.path.join(tmp_path, 'checkpoints'))


def test_command_line_rejects_unknown_fields(tmp_path):
  result, _ = run_train_cli(tmp_path, '--config.learning_rat=0.1')
  assert result.returncode != 0
  assert 'learning_rat' in result.stderr
