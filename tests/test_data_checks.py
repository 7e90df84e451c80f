"""Every data and split problem fails before the first step (data_checks)."""

import os
import subprocess
import sys

import pytest

from mixer_jax import config_defaults
from mixer_jax.training import config_validation
from mixer_jax.training import data_checks
from mixer_jax.training import trainer
from test_train import small_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ConfigError = config_validation.ConfigError


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def _with_eval(config, **fields):
  config.evals = {'extra': config_defaults.eval_entry(**fields)}
  return config


@pytest.mark.parametrize('overrides, expected', [
    ({'eval_split': 'test[:0]'}, r"eval_split='test\[:0\]' selects no "
     r'examples of digits \(its splits: test \(359\), train \(1438\)\)'),
    ({'train_split': 'train[:0%]'}, r"train_split='train\[:0%\]' selects no"),
    ({'eval_split': 'validation'}, r"eval_split='validation' is not a split "
     r'of digits .*Its splits are: test \(359\), train \(1438\)'),
    ({'train_split': 'train['}, r"train_split='train\[' is not a split"),
    ({'eval_split': 'test[300:100]'}, r'selects no examples'),
    ({'num_classes': 5}, r'num_classes=5 but digits has 10 classes, so labels'
     r' up to 9 would not fit the head'),
])
def test_bad_split_or_class_count_fails_before_anything(data_dir, tmp_path,
                                                         overrides, expected):
  workdir = tmp_path / 'run'
  with pytest.raises(ConfigError, match=expected):
    trainer.train_and_evaluate(small_config(data_dir, **overrides), str(workdir))
  assert not workdir.exists()  # Nothing compiled, trained or written.


@pytest.mark.parametrize('fields, expected', [
    ({'split': 'test[:0]'}, r"evals.extra.split='test\[:0\]' selects no"),
    ({'split': 'tset'}, r"evals.extra.split='tset' is not a split of digits"),
    ({'dataset': 'digits', 'label_key': 'real_label'},
     r"evals.extra: digits has no feature 'real_label'"),
    ({'kind': 'fewshot', 'fewshot_datasets': {'d': ('digits', 'train',
                                                    'test[:0%]')}},
     r'evals.extra.fewshot_datasets.d test split=.test\[:0%\]. selects no'),
])
def test_bad_evals_entry_fails_before_anything(data_dir, tmp_path, fields,
                                               expected):
  workdir = tmp_path / 'run'
  config = _with_eval(small_config(data_dir), **fields)
  with pytest.raises(ConfigError, match=expected):
    trainer.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()


def test_eval_entry_with_a_split_of_the_run_main_eval_split(data_dir):
  # An entry without its own split uses eval_split, named in the message.
  config = _with_eval(small_config(data_dir, eval_split='test'), split='')
  assert data_checks.checked_dataset_info(config).eval_examples == 359
  config.eval_split = 'test[:0]'
  with pytest.raises(ConfigError, match='eval_split'):
    data_checks.checked_dataset_info(config)


def test_every_process_needs_a_training_example(data_dir):
  config = small_config(data_dir, train_split='train[:1]', batch_size=1)
  assert data_checks.checked_dataset_info(config, num_processes=1
                                          ).train_examples == 1
  with pytest.raises(ConfigError, match="train_split='train\\[:1\\]'"):
    data_checks.checked_dataset_info(config, num_processes=2)


def test_good_config_passes(data_dir):
  info = data_checks.checked_dataset_info(
      _with_eval(small_config(data_dir, num_classes=12), split='test[:10]'))
  assert (info.num_classes, info.train_examples, info.eval_examples) == (
      12, 1294, 144)  # train[:90%], train[90%:] of digits' 1,438.


def test_empty_eval_split_on_the_command_line(data_dir, tmp_path):
  workdir = tmp_path / 'run'
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  run = subprocess.run(
      [sys.executable, '-m', 'mixer_jax.train', '--config=configs/quickstart.py',
       f'--workdir={workdir}', f'--config.data_dir={data_dir}',
       '--config.eval_split=test[:0]'], cwd=REPO, env=env,
      capture_output=True, text=True, timeout=300)
  assert run.returncode == 1, run.stderr[-3000:]
  assert "ConfigError: eval_split='test[:0]' selects no examples" in (
      run.stderr), run.stderr[-3000:]
  assert 'Traceback' not in run.stderr, run.stderr[-3000:]
  assert not workdir.exists()


def test_bad_images_of_both_splits_are_reported_together(tmp_path):
  # Without this, a bad test image showed only after the train split was
  # cleaned up and the run restarted.
  from test_datasets import write_folder  # pylint: disable=g-import-not-at-top
  root = str(tmp_path / 'images')
  write_folder(root, corrupt=True)  # broken.jpg and cut.png in train.
  with open(os.path.join(root, 'test', 'cat', 'bad.png'), 'wb') as f:
    f.write(b'\x89PNG\r\n\x1a\n not a png')
  config = config_defaults.get_config()
  config.dataset, config.folder, config.bad_images = 'folder', root, 'error'
  config.train_split, config.eval_split = 'train', 'test'
  from mixer_jax.data.datasets import sources  # pylint: disable=g-import-not-at-top
  with pytest.raises(sources.BadImagesError) as error:
    data_checks.checked_dataset_info(config, num_processes=1)
  message = str(error.value)
  for name in ('broken.jpg', 'cut.png', 'bad.png'):
    assert name in message
