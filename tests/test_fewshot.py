"""Tests of mixer_jax.training.linear_probe, mixer_jax.fewshot and mixer_jax.training.evals (config.evals).

The closed-form probe is checked against NumPy's least squares on the
same data; the periodic evaluations and the fewshot command run end to end
on a tiny model trained on the built-in digits data, and the ImageNet
recipe's evals run under tfds.testing.mock_data.
"""

import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import mock_tfds
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from mixer_jax import config_defaults
from configs import mixer_i1k
from mixer_jax import model_from_config
from mixer_jax.data import input_pipeline
from mixer_jax import fewshot
from mixer_jax.training import compiled
from mixer_jax.training import evals
from mixer_jax.training import linear_probe
from mixer_jax.training import reporting
from mixer_jax.training import sharding
from mixer_jax.training import trainer

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lstsq_probe(x, y, num_classes, l2_reg):
  """The same ridge regression as an augmented least-squares problem."""
  mean, std = x.mean(0), x.std(0) + 1e-5
  z = np.concatenate([(x - mean) / std, np.full((len(x), 1), 100.0)], 1)
  t = 2 * np.eye(num_classes)[y] - 1
  d = z.shape[1]
  a = np.concatenate([z, np.sqrt(l2_reg) * np.eye(d)])
  b = np.concatenate([t, np.zeros((d, num_classes))])
  return np.linalg.lstsq(a, b, rcond=None)[0], mean, std


@pytest.mark.parametrize('n,d', [(60, 7), (12, 30)])  # N >= D and N < D.
def test_fit_linear_equals_lstsq(n, d):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, size=d) + 2
  y = rng.integers(0, 4, size=n)
  for l2_reg in (1.0, 2.0**10):
    probe = linear_probe.fit_linear(x, y, 4, l2_reg)
    w, mean, std = _lstsq_probe(x, y, 4, l2_reg)
    np.testing.assert_allclose(probe['w'], w, rtol=1e-6, atol=1e-9)
    x_test = rng.normal(size=(20, d))
    z = np.concatenate([(x_test - mean) / std, np.full((20, 1), 100.0)], 1)
    np.testing.assert_array_equal(linear_probe.predict(probe, x_test),
                                  np.argmax(z @ w, 1))
  with pytest.raises(ValueError, match='l2_reg'):
    linear_probe.fit_linear(x, y, 4, 0.0)


def test_sample_shots_per_class_nested_and_seeded():
  labels = np.array([0] * 10 + [1] * 3 + [2] * 7)
  five = linear_probe.sample_shots(labels, 3, 5, seed=1)
  assert np.bincount(labels[five]).tolist() == [5, 3, 5]  # Class 1 has 3.
  assert set(linear_probe.sample_shots(labels, 3, 2, seed=1)) <= set(five)
  np.testing.assert_array_equal(five, linear_probe.sample_shots(labels, 3, 5, 1))
  assert not np.array_equal(five, linear_probe.sample_shots(labels, 3, 5, 2))


def test_probe_separates_clusters():
  rng = np.random.default_rng(3)
  centres = rng.normal(size=(5, 16)) * 4
  y = np.repeat(np.arange(5), 40)
  x = centres[y] + rng.normal(size=(200, 16))
  accs = linear_probe.probe_accuracies(x[::2], y[::2], x[1::2], y[1::2], 5,
                                  shots=(1, 10), l2_reg=1.0, num_seeds=2)
  assert len(accs[1]) == 2 and min(accs[10]) > 0.95


def test_real_sums_counts_top1_in_label_set():
  # Labels are multi-hot sets; example 2 has an empty set (mask 0).
  logits = np.array([[0, 5, 0], [9, 0, 0], [0, 0, 1], [0, 0, 3]], np.float32)
  batch = {'image': logits,
           'label': np.array([[1, 1, 0], [0, 1, 1], [0, 0, 0], [0, 0, 1]],
                             np.float32),
           'mask': np.array([1, 1, 0, 1], np.float32)}
  sums = compiled.real_sums({}, batch, apply_fn=lambda v, x, train: x)
  assert float(sums['correct']) == 2 and float(sums['count']) == 3


def test_multi_label_eval_batches_mask_empty_sets():
  images = tf.zeros([5, 6, 6, 3], tf.uint8)
  labels = tf.ragged.constant([[1, 2], [], [0], [], [2, 2]])
  examples = tf.data.Dataset.from_tensor_slices(
      {'image': images, 'label': labels})
  source = types.SimpleNamespace(name='sets', read=lambda *_: examples,
                                 shard_size=lambda *_: 5)
  batches = list(input_pipeline.eval_batches(
      source, 'test', batch_size=4, image_size=4, num_classes=3,
      crop='resize', resize=4, resize_method='area', multi_label=True,
      process_index=0, process_count=1).as_numpy_iterator())
  assert len(batches) == 2
  mask = np.concatenate([b['mask'] for b in batches])
  np.testing.assert_array_equal(mask, [1, 0, 1, 0, 1, 0, 0, 0])
  label = np.concatenate([b['label'] for b in batches])
  np.testing.assert_array_equal(label[:5], [[0, 1, 1], [0, 0, 0], [1, 0, 0],
                                            [0, 0, 0], [0, 0, 1]])


@pytest.fixture(scope='module')
def digits_run(tmp_path_factory):
  """A 30-step tiny Mixer on digits, with periodic evals; (config, workdir)."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  workdir = str(tmp_path_factory.mktemp('run'))
  config = config_defaults.get_config()
  config.model.variant = 'S_2'
  config.model.num_blocks = 1
  config.model.hidden_dim = 16
  config.model.tokens_mlp_dim = 8
  config.model.channels_mlp_dim = 32
  config.dataset, config.data_dir = 'digits', data_dir
  config.train_split, config.eval_split = 'train', 'test'
  config.image_size = 8
  config.cache = True
  config.pp.train_crop, config.pp.flip = 'resize', False
  config.pp.randaugment_layers, config.pp.mixup_prob = 0, 0.0
  config.pp.eval_crop = 'resize'
  config.batch_size, config.num_train_steps = 64, 30
  config.warmup_steps, config.learning_rate = 5, 3e-3
  config.loss = 'softmax'
  config.log_every_steps = config.eval_every_steps = 15
  config.checkpoint_every_steps = 30
  config.evals.heldout = config_defaults.eval_entry('classification', split='test',
                                           every_steps=10)
  config.evals.fewshot = config_defaults.eval_entry(
      'fewshot', fewshot_datasets={'digits': ('digits', 'train', 'test')},
      shots=(1, 5), num_seeds=2, every_steps=30)
  summary = trainer.train_and_evaluate(config, workdir)
  return config, workdir, summary


def test_periodic_evals_are_logged(digits_run):
  config, workdir, summary = digits_run
  rows = [r for r in reporting.read_metrics(workdir)]
  heldout = {r['step']: r for r in rows if 'heldout/accuracy' in r}
  assert sorted(heldout) == [10, 20, 30]
  assert all(r['heldout/examples'] == 359 for r in heldout.values())
  # The same split and model as the main eval: the same accuracy.
  assert heldout[30]['heldout/accuracy'] == pytest.approx(
      summary['last_eval_accuracy'], abs=1e-6)
  shots = [r for r in rows if 'fewshot/digits_5shot_accuracy' in r]
  assert [r['step'] for r in shots] == [30]
  assert 0.2 < shots[0]['fewshot/digits_5shot_accuracy'] <= 1.0
  assert 0.0 <= shots[0]['fewshot/digits_1shot_accuracy'] <= 1.0
  events = [f for f in os.listdir(workdir) if 'tfevents' in f]
  assert events  # TensorBoard gets the same scalars.


def _command(workdir, data_dir, *extra):
  out = subprocess.run(
      [sys.executable, '-m', 'mixer_jax.fewshot', f'--checkpoint={workdir}',
       '--dataset=digits', '--shots=1,5,10', '--json', '--num_seeds=2',
       f'--data_dir={data_dir}', *extra],
      cwd=_REPO, capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return [json.loads(line) for line in out.stdout.splitlines()
          if line.startswith('{')]


def test_fewshot_command_on_a_trained_workdir(digits_run):
  config, workdir, _ = digits_run
  rows = _command(workdir, config.data_dir)
  assert [(r['dataset'], r['shots']) for r in rows] == [
      ('digits', 1), ('digits', 5), ('digits', 10)]
  for r in rows:
    assert 0.0 <= r['accuracy'] <= 1.0 and len(r['accuracy_per_seed']) == 2
  assert rows[2]['accuracy'] > 0.3  # 10 shots of 10 classes: far above 0.1.
  # The probe of the periodic eval at the last step: same features, seeds.
  logged = [r for r in reporting.read_metrics(workdir)
            if 'fewshot/digits_5shot_accuracy' in r][-1]
  assert rows[1]['accuracy'] == pytest.approx(
      logged['fewshot/digits_5shot_accuracy'], abs=1e-6)
  again = fewshot.run(workdir, 'digits', shots=(1, 5, 10), num_seeds=2,
                      data_dir=config.data_dir)
  assert [r['accuracy_per_seed'] for r in again] == [
      r['accuracy_per_seed'] for r in rows]
  other = fewshot.run(workdir, 'digits', shots=(1,), num_seeds=2, seed=7,
                      data_dir=config.data_dir)
  assert other[0]['accuracy_per_seed'] != rows[0]['accuracy_per_seed']


def test_imagenet_recipe_evals_under_mock_data(tmp_path):
  config = mixer_i1k.get_config('S_32')
  assert set(config.evals) == {'minival', 'val', 'v2', 'real', 'fewshot'}
  assert config.evals.real.label_key == 'real_label'
  data_dir = str(tmp_path)
  for name, splits in (('imagenet2012', ['train', 'validation']),
                       ('imagenet_v2', ['test']),
                       ('imagenet2012_real', ['validation']),
                       ('cifar100', ['train', 'test'])):
    mock_tfds.write_split_sizes(name, data_dir, splits, 24)
  config.data_dir = data_dir
  config.image_size, config.batch_size = 32, 8
  config.model.num_blocks, config.model.hidden_dim = 1, 16
  config.model.tokens_mlp_dim, config.model.channels_mlp_dim = 8, 16
  config.model.dtype = 'float32'
  config.pp.eval_resize = 36
  for entry in config.evals.values():
    entry.resize = 36 if entry.resize else 0
  config.evals.fewshot.fewshot_datasets = {
      'cifar100': ('cifar100', 'train', 'test')}
  config.evals.fewshot.shots = (1, 2)
  config.fsdp_min_size_mb = 0.0  # Split even this tiny model's arrays.
  model = model_from_config.create_model(config, 1000)
  params = jax.tree.map(
      lambda x: x + 0.01 * jax.random.normal(jax.random.PRNGKey(1), x.shape),
      model.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3)))['params'])
  params = jax.tree.map(np.asarray, params)
  results = {}
  # 8 devices with fsdp parameters (the placement that crashed at the first
  # config.evals entry) against one device with replicated ones.
  for strategy, devices in (('fsdp', jax.devices()), ('replicate',
                                                       jax.devices()[:1])):
    config.sharding = strategy
    functions = compiled.build(config, model, sharding.create_mesh(devices))
    runner = evals.Evaluations(config, functions, num_train_steps=5000)
    assert set(runner.due(2500)) & set(runner.entries) == {
        'minival', 'val', 'v2', 'real'}
    placed = sharding.put(params, functions.params_sharding)
    results[strategy] = {}
    with tfds.testing.mock_data(num_examples=24, data_dir=data_dir):
      for name in set(runner.due(25_000)) & set(runner.entries):
        results[strategy].update(runner.run_one(name, placed))
  fsdp, one = results['fsdp'], results['replicate']
  assert fsdp.keys() == one.keys()
  for key in fsdp:
    assert fsdp[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
  # Every example of a whole split is scored once: mock_data's 24.
  assert (fsdp['val/examples'], fsdp['v2/examples']) == (24, 24)
  assert fsdp['minival/examples'] > 0
  # Mock ReaL label sets may be empty: those images are left out.
  assert 0 < fsdp['real/examples'] <= 24
  assert {k for k in fsdp if k.startswith('fewshot/')} == {
      'fewshot/cifar100_1shot_accuracy', 'fewshot/cifar100_2shot_accuracy'}
