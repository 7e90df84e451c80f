"""Tests of configs/*.py and mixer_jax.training.config_validation."""

import glob
import importlib.util
import os
import subprocess
import sys
import time

import math

import pytest

from mixer_jax import config_defaults
from mixer_jax import model_from_config
from mixer_jax.data.datasets import sources
from mixer_jax.training import compiled
from mixer_jax.training import config_validation
from mixer_jax.training import evals
from mixer_jax.training import optim
from mixer_jax.training import sharding
from mixer_jax.training import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py')))


def load(name, *args):
  path = os.path.join(ROOT, 'configs', f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'_cfg_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


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
  assert {'quickstart', 'b16', 'mixer_i1k',
          'finetune_cifar10'} <= names


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_config_is_valid_and_defines_only_common_fields(path):
  name = os.path.basename(path)[:-3]
  config = load(name)
  config_validation.validate_config(config, num_devices=8, num_processes=2)
  # config.evals entries are named by each config; their fields must be
  # exactly those of eval_entry (fewshot_datasets names are free).
  entry_fields = set(config_defaults.eval_entry().keys())
  for entry_name, entry in config.get('evals', {}).items():
    assert set(entry.keys()) == entry_fields, (name, entry_name)
  extra = {k for k in flat_keys(config) - flat_keys(
      config_defaults.get_config()) if not k.startswith('evals.')}
  assert not extra, f'{name} sets fields missing from the defaults: {extra}'


# big_vision's published ImageNet-1k recipe, read from
# google-research/big_vision big_vision/configs/mlp_mixer_i1k.py (commit
# 1c965d15): our field -> the value its field sets (named in the comment).
BIG_VISION_MLP_MIXER_I1K = {
    'dataset': 'imagenet2012',  # config.dataset
    'train_split': 'train[:99%]',  # config.train_split
    'cache_raw': True,  # config.cache_raw
    'model.head_bias_init': -6.9,  # config.init_head_bias
    'loss': 'sigmoid',  # config.loss = 'sigmoid_xent'
    'image_size': 224,  # decode_jpeg_and_inception_crop(224)
    'pp.train_crop': 'inception',  # decode_jpeg_and_inception_crop
    'pp.flip': True,  # flip_lr
    'pp.randaugment_layers': 2,  # randaug(2,15)
    'pp.randaugment_magnitude': 15,
    'pp.eval_crop': 'resize_crop',  # resize_small(256)|central_crop(224)
    'pp.eval_resize': 256,
    'batch_size': 4096,  # config.batch_size
    'num_epochs': 300,  # config.num_epochs
    'shuffle_buffer': 250_000,  # config.shuffle_buffer_size
    'model.stochastic_depth': 0.1,  # config.model.stoch_depth
    'pp.mixup_alpha': 0.5,  # config.mixup = dict(p=0.5): Beta(0.5, 0.5),
    'pp.mixup_prob': 1.0,  # ... on every batch.
    'optimizer': 'adam',  # config.optax_name = 'scale_by_adam'
    'b1': 0.9,  # optax.scale_by_adam defaults
    'b2': 0.999,
    'grad_clip_norm': 1.0,  # config.grad_clip_norm
    'learning_rate': 1e-3,  # config.lr
    'weight_decay': 1e-4,  # config.wd (decoupled, on kernels)
    'lr_schedule': 'linear',  # config.schedule.decay_type
    'warmup_steps': 10_000,  # config.schedule.warmup_steps
    'end_learning_rate_multiplier': 1e-5,  # config.schedule.linear_end
    'model.dtype': 'float32',  # big_vision's Mixer has no dtype.
    'model.gelu_approximate': True,  # nn.gelu's default (tanh).
}
# Its evals: split (and dataset) of each, every 2,500 steps (log_steps).
BIG_VISION_I1K_EVALS = {
    'minival': ('', 'train[99%:]'), 'val': ('', 'validation'),
    'v2': ('imagenet_v2', 'test'), 'real': ('imagenet2012_real', 'validation'),
}

# vit_jax's Mixer-B/16 CIFAR fine-tuning, read from
# google-research/vision_transformer vit_jax/configs/common.py and
# configs/mixer_base16_cifar10.py (commit 0f6b288d), optimizer from
# vit_jax/train.py (optax.sgd, momentum 0.9, no weight decay).
VIT_JAX_MIXER_CIFAR = {
    'train_split': 'train[:98%]',  # pp.train
    'image_size': 224,  # pp.crop
    'num_train_steps': 10_000,  # total_steps
    'batch_size': 512,  # batch
    'grad_accum_steps': 8,  # accum_steps
    'shuffle_buffer': 50_000,  # shuffle_buffer
    'learning_rate': 0.03,  # base_lr
    'lr_schedule': 'cosine',  # decay_type
    'warmup_steps': 500,  # warmup_steps
    'end_learning_rate_multiplier': 0.0,  # its cosine ends at 0
    'grad_clip_norm': 1.0,  # grad_norm_clip
    'momentum_dtype': 'bfloat16',  # optim_dtype
    'optimizer': 'sgd', 'b1': 0.9, 'weight_decay': 0.0,
    'loss': 'softmax',
    'model.dtype': 'float32',  # vit_jax's Mixer has no dtype.
    'model.variant': 'B_16',  # get_mixer_b16_config
    'eval_every_steps': 100,  # eval_every
}


def field(config, dotted):
  node = config
  for part in dotted.split('.'):
    node = node[part]
  return node


def assert_matches(config, reference):
  wrong = {k: (field(config, k), v) for k, v in reference.items()
           if field(config, k) != v}
  assert not wrong, f'(ours, reference): {wrong}'


def big_vision_multiplier(step, total, warmup=10_000, linear_end=1e-5):
  """utils.create_learning_rate_schedule(base=1, decay_type='linear')."""
  progress = min(max((step - warmup) / (total - warmup), 0.0), 1.0)
  value = linear_end + (1.0 - linear_end) * (1.0 - progress)
  return value * min(1.0, step / warmup)


@pytest.mark.parametrize('variant', ['S_32', 'S_16', 'S_8', 'B_32', 'B_16',
                                     'L_32', 'L_16', 'H_14'])
def test_every_variant_is_big_visions_recipe(variant):
  config = load('mixer_i1k', variant)
  assert config.model.variant == variant
  assert_matches(config, BIG_VISION_MLP_MIXER_I1K)
  for name, (dataset, split) in BIG_VISION_I1K_EVALS.items():
    entry = config.evals[name]
    assert (entry.dataset, entry.split, entry.every_steps) == (
        dataset, split, 2_500), name
  assert config.evals.real.label_key == 'real_label'
  config_validation.validate_config(config, num_devices=8, num_processes=2)


def test_b16_is_big_visions_b16():
  config = load('b16')
  assert config.model.variant == 'B_16'  # config.model.variant = 'B/16'
  assert_matches(config, BIG_VISION_MLP_MIXER_I1K)


def test_i1k_learning_rate_is_big_visions():
  # The schedule the config gives, against big_vision's formula worked out
  # here, over 300 epochs of train[:99%] (1,268,355 images) at batch 4096.
  config = load('mixer_i1k')
  total = trainer.num_train_steps_for(config, 1_268_355)
  assert total in (92_897, 92_898)  # big_vision rounds (92,897.1), we ceil.
  lr = optim.learning_rate_fn(config, total)
  for step in (1, 5_000, 10_000, 51_449, total - 1000):
    assert float(lr(step)) == pytest.approx(
        1e-3 * big_vision_multiplier(step, total), rel=1e-4), step
  # The last update is 1 / (T - 10k) above the end, 1e-3 * 1e-5 = 1e-8.
  last = 1e-3 * big_vision_multiplier(total - 1, total)
  assert float(lr(total - 1)) == pytest.approx(last, rel=1e-2)
  assert float(lr(total)) == pytest.approx(1e-8, rel=1e-4)


@pytest.mark.parametrize('name, dataset', [('finetune_cifar10', 'cifar10'),
                                           ('finetune_cifar100', 'cifar100')])
def test_finetune_is_vit_jax_recipe(name, dataset):
  config = load(name)
  assert config.dataset == dataset
  assert_matches(config, VIT_JAX_MIXER_CIFAR)
  assert config.pp.train_crop == 'finetune' and config.pp.eval_crop == 'resize'
  # vit_jax reports the test split; here it is scored once, at the end, and
  # the checkpoint is picked on the 2% of train vit_jax leaves out.
  assert config.evals.test.split == 'test'
  assert config.eval_split == 'train[98%:]'
  # vit_jax's cosine: 0.03 * (1 + cos(pi p)) / 2, p = (t - 500) / 9,500.
  lr = optim.learning_rate_fn(config, config.num_train_steps)
  for step, p in ((500, 0.0), (2_875, 0.25), (7_625, 0.75)):
    assert float(lr(step)) == pytest.approx(
        0.03 * 0.5 * (1 + math.cos(math.pi * p)), rel=1e-5)


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_no_config_selects_on_test_data(path):
  # The split that picks the best checkpoint is held out of train; a test
  # split is only scored once, at the last step.
  config = load(os.path.basename(path)[:-3])
  assert config.eval_split.startswith('train['), config.eval_split
  assert config.train_split.startswith('train'), config.train_split
  for name, entry in config.evals.items():
    if entry.split == 'test' and entry.dataset in ('', config.dataset):
      assert entry.every_steps == -1, name


def test_quickstart_held_out_split_is_disjoint_from_training(tmp_path):
  config = load('quickstart')
  config.data_dir = str(tmp_path)
  source = sources.get_source(config)

  def images(split):
    return {bytes(ex['image'].numpy())
            for ex in source.read(split, 0, 1)}

  train, held_out = images(config.train_split), images(config.eval_split)
  assert len(held_out) >= 100  # Enough to rank checkpoints (1 image < 1%).
  assert not train & held_out
  assert not images('test') & held_out


def test_a_test_entry_runs_only_at_the_last_step():
  config = load('quickstart')
  model = model_from_config.create_model(config, 10)
  functions = compiled.build(config, model, sharding.create_mesh())
  evaluations = evals.Evaluations(config, functions, num_train_steps=1_500)
  assert [s for s in range(1, 1_501) if 'test' in evaluations.due(s)] == [
      1_500]
  assert [s for s in range(1, 1_501) if evaluations.due(s)] == [
      500, 1_000, 1_500]  # The held-out split every 500 steps.


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
    ('learning_rate', -1.0, '> 0.0'),
    ('label_smoothing', 1.0, '< 1.0'),
    ('grad_accum_steps', 0, '>= 1'),
    ('warmup_steps', 5_000, 'smaller than num_train_steps'),
    ('eval_every_steps', 0, '>= 1'),
    ('num_classes', 0, 'or -1'),
    ('pp.train_crop', 'random', 'inception, finetune, resize'),
    ('model.stochastic_depth', 1.0, '< 1.0'),
    ('end_learning_rate_multiplier', 1.5, '<= 1'),
    ('evals.test.every_steps', -2, '(or -1)'),
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


def test_mixup_takes_an_odd_batch_per_device():
  # The roll by one pairs across devices: no batch is refused for mixup.
  config = load('quickstart')
  config.pp.mixup_alpha, config.pp.mixup_prob = 0.5, 1.0
  config.batch_size = 24
  config_validation.validate_config(config, num_devices=8)


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
  # Values are checked with the flags, before JAX loads; the batch against
  # the 8 devices when the trainer has them.
  result, seconds = run_train_cli(tmp_path, '--config.optimizer=adamw',
                                  '--config.grad_accum_steps=0')
  assert result.returncode != 0
  assert 'config.optimizer=\'adamw\'' in result.stderr, result.stderr[-2000:]
  assert 'config.grad_accum_steps=0' in result.stderr
  assert 'Traceback' not in result.stderr and seconds < 10, seconds
  result, _ = run_train_cli(tmp_path, '--config.batch_size=36')
  assert result.returncode != 0
  assert 'config.batch_size=36' in result.stderr, result.stderr[-2000:]
  assert not os.path.exists(os.path.join(tmp_path, 'checkpoints'))


def test_command_line_rejects_unknown_fields(tmp_path):
  result, _ = run_train_cli(tmp_path, '--config.learning_rat=0.1')
  assert result.returncode != 0
  assert 'learning_rat' in result.stderr
