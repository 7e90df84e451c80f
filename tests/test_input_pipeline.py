"""Tests of mixer_jax.data.input_pipeline on digits, mocked TFDS data and folders."""

import collections
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mixer_jax import config_defaults
from mixer_jax.data import input_pipeline
from mixer_jax.data.datasets import sources
# The folder-of-images fixture is shared with test_datasets.py (pytest puts
# the tests' directory on the path).
from test_datasets import write_folder


@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  tfds.builder('digits', data_dir=data_dir).download_and_prepare()
  return data_dir


def _config(data_dir, **overrides):
  config = config_defaults.get_config()
  config.dataset = 'digits'
  config.data_dir = data_dir
  config.train_split = 'train'
  config.eval_split = 'test'
  config.image_size = 16
  config.batch_size = 32
  config.shuffle_buffer = 256
  # One RandAugment op per image: the same code path as two, half the
  # graph to trace (tests that do not need it turn it off).
  config.pp.randaugment_layers = 1
  for key, value in overrides.items():
    target = config
    *path, name = key.split('.')
    for part in path:
      target = target[part]
    target[name] = value
  return config


# No augmentation, 8x8 output (digits are 8x8, so resizing is the
# identity): training images identify the examples they came from.
_PLAIN = {'image_size': 8, 'pp.train_crop': 'resize', 'pp.flip': False,
          'pp.randaugment_layers': 0, 'pp.mixup_prob': 0.0,
          'pp.eval_crop': 'resize'}


def _take(ds, n):
  return [b for _, b in zip(range(n), ds.as_numpy_iterator())]


def _key(image):
  return np.round(image * 1000).astype(np.int32).tobytes()


def test_dataset_info(digits_dir):
  info = input_pipeline.dataset_info(_config(digits_dir))
  assert info == input_pipeline.DatasetInfo(10, 1438, 359, 0)
  info = input_pipeline.dataset_info(_config(digits_dir, num_classes=12))
  assert info.num_classes == 12
  with pytest.raises(ValueError, match='num_classes'):
    input_pipeline.dataset_info(_config(digits_dir, num_classes=5))


def test_train_batches_shapes_and_range(digits_dir):
  config = _config(digits_dir)  # Default pp: inception, RandAugment, mixup.
  batches = _take(input_pipeline.train_dataset(
      config, process_index=0, process_count=2), 3)
  for batch in batches:
    assert set(batch) == {'image', 'label'}
    assert batch['image'].shape == (16, 16, 16, 3)
    assert batch['image'].dtype == np.float32
    assert -1 <= batch['image'].min() and batch['image'].max() <= 1
    assert batch['image'].std() > 0.1
    assert batch['label'].shape == (16, 10)
    assert batch['label'].dtype == np.float32
    np.testing.assert_allclose(batch['label'].sum(1), 1.0, atol=1e-5)


def test_same_seed_same_batches_other_seed_differs(digits_dir):
  first = _take(input_pipeline.train_dataset(
      _config(digits_dir), process_index=0, process_count=1), 3)
  again = _take(input_pipeline.train_dataset(
      _config(digits_dir), process_index=0, process_count=1), 3)
  other = _take(input_pipeline.train_dataset(
      _config(digits_dir, seed=1), process_index=0, process_count=1), 3)
  for a, b, c in zip(first, again, other):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
    assert not np.array_equal(a['image'], c['image'])


@pytest.mark.parametrize('start_step', [3, 46])
def test_resume_equals_uninterrupted_run(digits_dir, start_step):
  # 1438 examples / 32 per batch: step 46 lies in the second epoch.
  config = _config(digits_dir)
  full = _take(input_pipeline.train_dataset(
      config, process_index=0, process_count=1), start_step + 3)
  resumed = _take(input_pipeline.train_dataset(
      config, start_step=start_step, process_index=0, process_count=1), 3)
  for a, b in zip(full[start_step:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


def test_resume_far_ahead_does_not_replay(digits_dir):
  # Step 10**6 is epoch ~22,000: replaying would never finish; starting one
  # step earlier must give the same batch one position later.
  config = _config(digits_dir, **{'pp.randaugment_layers': 0})
  step = 10**6
  before = _take(input_pipeline.train_dataset(
      config, start_step=step - 1, process_index=0, process_count=1), 2)
  at = _take(input_pipeline.train_dataset(
      config, start_step=step, process_index=0, process_count=1), 1)
  np.testing.assert_array_equal(before[1]['image'], at[0]['image'])
  np.testing.assert_array_equal(before[1]['label'], at[0]['label'])


def test_epochs_are_reshuffled_permutations(digits_dir):
  config = _config(digits_dir, batch_size=2, **_PLAIN)
  n = 1438
  stream = np.concatenate([b['image'] for b in _take(
      input_pipeline.train_dataset(config, process_index=0, process_count=1),
      n)])  # Exactly two epochs.
  epoch1, epoch2 = [[_key(x) for x in stream[i * n:(i + 1) * n]]
                    for i in range(2)]
  assert len(set(epoch1)) == n and set(epoch1) == set(epoch2)
  assert epoch1 != epoch2


def test_two_processes_train_on_disjoint_halves(digits_dir):
  config = _config(digits_dir, batch_size=2, **_PLAIN)
  seen = []
  for index in range(2):
    shard = 719  # 1438 / 2; the first epoch is the first 719 examples.
    batches = _take(input_pipeline.train_dataset(
        config, process_index=index, process_count=2), shard)
    seen.append({_key(x) for b in batches for x in b['image']})
    assert len(seen[-1]) == shard
  assert not seen[0] & seen[1]
  evals = _take(input_pipeline.eval_dataset(
      _config(digits_dir, eval_split='train', batch_size=2, **_PLAIN),
      process_index=0, process_count=1), 10_000)
  everything = {_key(x) for b in evals for x in b['image']}
  assert seen[0] | seen[1] == everything


@pytest.mark.parametrize('process_count', [1, 2, 3])
def test_eval_scores_every_example_once(digits_dir, process_count):
  config = _config(digits_dir, batch_size=48, **_PLAIN)
  per_process = [list(input_pipeline.eval_dataset(
      config, process_index=i, process_count=process_count
  ).as_numpy_iterator()) for i in range(process_count)]
  assert len({len(batches) for batches in per_process}) == 1
  counts = collections.Counter()
  for batches in per_process:
    for batch in batches:
      assert batch['image'].shape == (48 // process_count, 8, 8, 3)
      assert batch['mask'].dtype == np.float32
      real = batch['mask'] == 1
      assert np.all(batch['mask'][~real] == 0)
      assert np.all(batch['image'][~real] == 0)
      assert np.all(batch['label'][~real] == 0)
      counts.update(_key(x) for x in batch['image'][real])
  assert sum(counts.values()) == 359 and len(counts) == 359


def test_cache_gives_the_same_stream(digits_dir):
  kwargs = {'pp.randaugment_layers': 0}
  plain = _take(input_pipeline.train_dataset(
      _config(digits_dir, **kwargs), process_index=0, process_count=1), 2)
  cached = _take(input_pipeline.train_dataset(
      _config(digits_dir, cache=True, **kwargs), process_index=0,
      process_count=1), 2)
  for a, b in zip(plain, cached):
    np.testing.assert_array_equal(a['image'], b['image'])


@pytest.mark.parametrize('image_size,cache', [(8, True), (16, False)])
def test_batched_preprocessing_equals_the_per_image_path(
    digits_dir, monkeypatch, image_size, cache):
  # A plain resize without flip or RandAugment, on a data set that declares
  # its image size (digits: 8x8), runs a batch at a time; the stream, also
  # resumed mid-epoch and in the second epoch, is the per-image path's.
  config = _config(digits_dir, cache=cache,
                   **dict(_PLAIN, image_size=image_size))
  source = sources.get_source(config)
  assert input_pipeline.batched_preprocessing(config, source)
  for drawn in ({'pp.flip': True}, {'pp.randaugment_layers': 1},
                {'pp.train_crop': 'finetune'}):
    assert not input_pipeline.batched_preprocessing(
        _config(digits_dir, **dict(_PLAIN, **drawn)), source)

  def stream():
    return [b for start in (0, 20, 46) for b in _take(
        input_pipeline.train_dataset(config, start_step=start,
                                     process_index=0, process_count=1), 2)]

  batched = stream()
  monkeypatch.setattr(input_pipeline, 'batched_preprocessing',
                      lambda *_: False)
  per_image = stream()
  assert len(batched) == len(per_image) == 6
  for a, b in zip(batched, per_image):
    assert a['image'].shape == (32, image_size, image_size, 3)
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


def test_batch_size_must_split_over_processes(digits_dir):
  with pytest.raises(ValueError, match='batch_size'):
    input_pipeline.train_dataset(_config(digits_dir, batch_size=33),
                                 process_index=0, process_count=2)


def _mock_metadata(name, data_dir, splits, num_examples):
  """Writes metadata so that tfds.testing.mock_data knows the splits."""
  builder = tfds.builder(name, data_dir=data_dir)
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=s, shard_lengths=[num_examples], num_bytes=0)
      for s in splits]))
  os.makedirs(builder.data_dir)
  builder.info.write_to_directory(builder.data_dir)


@pytest.mark.parametrize('name,train,evaluation,classes', [
    ('cifar10', 'train[:98%]', 'test', 10),
    ('imagenet2012', 'train[:99%]', 'validation', 1000),
])
def test_tfds_pipelines_under_mock_data(tmp_path, name, train, evaluation,
                                        classes):
  _mock_metadata(name, str(tmp_path), ['train', evaluation], 24)
  config = _config(str(tmp_path), dataset=name, train_split=train,
                   eval_split=evaluation, image_size=32, batch_size=8)
  config.pp.eval_resize = 40
  config.pp.randaugment_layers = 0
  with tfds.testing.mock_data(num_examples=24, data_dir=str(tmp_path)):
    assert input_pipeline.dataset_info(config).num_classes == classes
    train_batch = _take(input_pipeline.train_dataset(
        config, process_index=0, process_count=1), 1)[0]
    eval_batch = _take(input_pipeline.eval_dataset(
        config, process_index=0, process_count=1), 1)[0]
  for batch in (train_batch, eval_batch):
    assert batch['image'].shape == (8, 32, 32, 3)
    assert batch['image'].dtype == np.float32
    assert -1 <= batch['image'].min() and batch['image'].max() <= 1
    assert batch['image'].std() > 0.1  # Random mock pixels, not padding.
    assert batch['label'].shape == (8, classes)
    np.testing.assert_allclose(batch['label'].sum(1), 1.0, atol=1e-5)
  np.testing.assert_array_equal(eval_batch['mask'], 1.0)


def test_folder_pipeline_with_corrupt_files(tmp_path):
  write_folder(str(tmp_path), corrupt=True)
  sources.find_bad_images.cache_clear()
  config = _config(None, dataset='folder', folder=str(tmp_path),
                   image_size=8, batch_size=4)
  config.pp.randaugment_layers = 0
  with pytest.raises(sources.BadImagesError, match='broken.jpg'):
    input_pipeline.train_dataset(config, process_index=0, process_count=1)
  config.bad_images = 'skip'
  info = input_pipeline.dataset_info(config)
  assert info == input_pipeline.DatasetInfo(2, 12, 6, 2)
  batch = _take(input_pipeline.train_dataset(
      config, process_index=0, process_count=1), 1)[0]
  assert batch['image'].shape == (4, 8, 8, 3)
  batches = list(input_pipeline.eval_dataset(
      config, process_index=0, process_count=1).as_numpy_iterator())
  assert len(batches) == 2 and sum(b['mask'].sum() for b in batches) == 6
  for batch in batches:
    for image, label, mask in zip(*(batch[k] for k in
                                    ('image', 'label', 'mask'))):
      if mask:  # cat pixels 40, dog pixels 200, in [-1, 1].
        expected = (np.array([40, 200]) - 127.5) / 127.5
        assert abs(image.mean() - expected[label.argmax()]) < 0.03
