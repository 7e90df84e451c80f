"""Tests of mixer_jax.data.datasets: the digits builder and the data sources."""

import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from sklearn import datasets as sk_datasets

from mixer_jax.data.datasets import digits
from mixer_jax.data.datasets import sources


@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  tfds.builder('digits', data_dir=data_dir).download_and_prepare()
  return data_dir


def _split(data_dir, split):
  ds = tfds.builder('digits', data_dir=data_dir).as_dataset(split=split)
  return list(ds.as_numpy_iterator())


def test_digits_is_registered():
  assert 'digits' in tfds.list_builders(with_community_datasets=False)


def test_digits_splits_sizes_and_labels(digits_dir):
  builder = tfds.builder('digits', data_dir=digits_dir)
  assert builder.info.splits['train'].num_examples == 1438
  assert builder.info.splits['test'].num_examples == 359
  assert builder.info.features['label'].num_classes == 10
  for split, size in (('train', 1438), ('test', 359)):
    examples = _split(digits_dir, split)
    assert len(examples) == size
    labels = np.array([ex['label'] for ex in examples])
    assert labels.min() == 0 and labels.max() == 9
    assert len(set(labels.tolist())) == 10
    assert examples[0]['image'].shape == (8, 8, 1)
    assert examples[0]['image'].dtype == np.uint8


def test_digits_test_split_is_every_fifth_sklearn_image(digits_dir):
  sk = sk_datasets.load_digits()
  # Independent scaling: 0..16 -> 0..255 by integer arithmetic.
  scaled = (sk.images.astype(np.int64) * 255 * 2 + 16) // 32
  expected = {(scaled[i].astype(np.uint8).tobytes(), int(sk.target[i]))
              for i in range(4, 1797, 5)}
  got = {(ex['image'][..., 0].tobytes(), int(ex['label']))
         for ex in _split(digits_dir, 'test')}
  assert got == expected
  train = {(ex['image'][..., 0].tobytes(), int(ex['label']))
           for ex in _split(digits_dir, 'train')}
  assert not train & got and len(train) == 1438


def test_to_uint8_endpoints():
  np.testing.assert_array_equal(digits.to_uint8([0, 16, 8]), [0, 255, 128])


def test_shard_range_is_a_partition():
  for n in (0, 1, 7, 359, 1000):
    for count in (1, 2, 3, 8):
      ranges = [sources.shard_range(n, i, count) for i in range(count)]
      assert ranges[0][0] == 0 and ranges[-1][1] == n
      assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
      sizes = [end - start for start, end in ranges]
      assert max(sizes) - min(sizes) <= 1


def test_tfds_source_shards_are_disjoint_and_cover(digits_dir):
  source = sources.TfdsSource('digits', digits_dir)
  whole = sorted(ex['image'] for ex in
                 source.read('train[:99%]', 0, 1).as_numpy_iterator())
  parts = [[ex['image'] for ex in
            source.read('train[:99%]', i, 3).as_numpy_iterator()]
           for i in range(3)]
  assert [len(p) for p in parts] == [
      source.shard_size('train[:99%]', i, 3) for i in range(3)]
  assert sorted(sum(parts, [])) == whole
  assert len(whole) == round(0.99 * 1438)


def test_missing_manual_dataset_error_says_what_and_where(tmp_path):
  with pytest.raises(sources.DatasetUnavailableError) as e:
    sources.TfdsSource('imagenet2012', str(tmp_path))
  message = str(e.value)
  assert "'imagenet2012'" in message
  assert str(tmp_path) in message
  assert os.path.join(str(tmp_path), 'downloads', 'manual') in message
  assert 'ILSVRC2012_img_train.tar' in message


def test_offline_download_fails_fast_with_instructions(tmp_path,
                                                      monkeypatch):
  def no_network(*args, **kwargs):
    raise OSError('Network is unreachable')

  # Simulate a machine without network, whatever this one has.
  monkeypatch.setattr(sources.socket, 'create_connection', no_network)
  monkeypatch.setattr(sources.urllib.request, 'getproxies', dict)
  with pytest.raises(sources.DatasetUnavailableError) as e:
    sources.TfdsSource('cifar10', str(tmp_path))
  message = str(e.value)
  assert "'cifar10'" in message and str(tmp_path) in message
  assert 'www.cs.toronto.edu' in message
  assert 'tfds build cifar10 --data_dir=' in message


def test_unknown_dataset_error():
  with pytest.raises(sources.DatasetUnavailableError, match='no_such_set'):
    sources.TfdsSource('no_such_set', None)


def write_folder(root, corrupt=False):
  """root/{train,test}/{cat,dog}/*.{png,jpg} with a known pixel per class."""
  for split, count in (('train', 6), ('test', 3)):
    for label, value in (('cat', 40), ('dog', 200)):
      folder = os.path.join(root, split, label)
      os.makedirs(folder)
      for i in range(count):
        image = np.full((10 + i, 12, 3), value, np.uint8)
        if i % 2:
          data = tf.io.encode_png(image).numpy()
          name = f'{i}.png'
        else:
          data = tf.io.encode_jpeg(image, quality=100).numpy()
          name = f'{i}.jpg'
        with open(os.path.join(folder, name), 'wb') as f:
          f.write(data)
  if corrupt:  # Garbage behind a JPEG header, and a truncated PNG.
    with open(os.path.join(root, 'train', 'dog', 'broken.jpg'), 'wb') as f:
      f.write(b'\xff\xd8\xff\xe0 this is not really a jpeg')
    noise = np.random.RandomState(0).randint(0, 255, (32, 32, 3), np.uint8)
    data = tf.io.encode_png(noise).numpy()
    with open(os.path.join(root, 'train', 'cat', 'cut.png'), 'wb') as f:
      f.write(data[:len(data) // 2])


def test_folder_source_error_names_the_corrupt_file(tmp_path):
  write_folder(str(tmp_path), corrupt=True)
  source = sources.FolderSource(str(tmp_path), 'error')
  assert source.class_names == ['cat', 'dog']
  with pytest.raises(sources.BadImagesError, match='broken.jpg') as e:
    source.num_examples('train')
  assert 'cut.png' in str(e.value) and '2 image file(s)' in str(e.value)
  assert "bad_images='skip'" in str(e.value)
  # The test split has no corrupt file and loads.
  assert source.num_examples('test') == 6


def test_folder_source_skip_counts_and_drops(tmp_path):
  write_folder(str(tmp_path), corrupt=True)
  sources.find_bad_images.cache_clear()
  source = sources.FolderSource(str(tmp_path), 'skip')
  assert source.num_examples('train') == 12
  assert source.skipped('train') == 2
  examples = list(source.read('train', 0, 1).as_numpy_iterator())
  assert len(examples) == 12
  for ex in examples:
    image = tf.io.decode_image(ex['image'], channels=3).numpy()
    # cat (label 0) pixels are 40, dog (label 1) pixels are 200.
    assert abs(int(image.mean()) - (40, 200)[ex['label']]) <= 2


def test_folder_source_slices_and_shards(tmp_path):
  write_folder(str(tmp_path))
  source = sources.FolderSource(str(tmp_path))
  assert source.num_examples('train[:50%]') == 6
  assert source.num_examples('train[50%:]+test') == 12
  whole = sorted(ex['image'] for ex in
                 source.read('train+test', 0, 1).as_numpy_iterator())
  parts = [list(source.read('train+test', i, 2).as_numpy_iterator())
           for i in range(2)]
  assert sorted(ex['image'] for p in parts for ex in p) == whole
  assert len(whole) == 18
  with pytest.raises(ValueError, match='split folders'):
    source.num_examples('validation')


def test_folder_source_missing_root(tmp_path):
  with pytest.raises(sources.DatasetUnavailableError, match='does not exist'):
    sources.FolderSource(str(tmp_path / 'nope'))


def _png(path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(tf.io.encode_png(np.zeros((4, 4, 3), np.uint8)).numpy())


def test_folder_layout_good_is_accepted(tmp_path):
  write_folder(str(tmp_path))
  assert sources.check_folder_layout(str(tmp_path)) == []
  os.makedirs(tmp_path / 'notes')  # A folder without class folders: no split.
  assert sources.check_folder_layout(str(tmp_path)) == []


def test_folder_with_an_empty_class_folder_is_refused(tmp_path):
  write_folder(str(tmp_path))
  os.makedirs(tmp_path / 'train' / 'cow')
  os.makedirs(tmp_path / 'test' / 'cow')
  with pytest.raises(sources.FolderLayoutError) as e:
    sources.FolderSource(str(tmp_path))
  message = str(e.value)
  assert f'Class folder {tmp_path}/train/cow has no .jpg/.jpeg/.png' in message
  assert f'{tmp_path}/test/cow' in message
  assert 'add images or remove the folder' in message
  assert isinstance(e.value, sources.DatasetUnavailableError)  # No traceback.


def test_folder_with_a_class_only_in_test_is_refused(tmp_path):
  write_folder(str(tmp_path))
  _png(str(tmp_path / 'test' / 'cow' / '0.png'))
  with pytest.raises(sources.FolderLayoutError,
                     match=r"Class 'cow' has images in test but no folder "
                     f'{tmp_path}/train/cow') as e:
    sources.FolderSource(str(tmp_path))
  assert 'every split must have the same class folders' in str(e.value)


def test_folder_with_nested_images_is_refused(tmp_path):
  write_folder(str(tmp_path))
  _png(str(tmp_path / 'train' / 'dog' / 'puppies' / 'small' / '0.png'))
  _png(str(tmp_path / 'train' / 'stray.png'))
  with pytest.raises(sources.FolderLayoutError) as e:
    sources.FolderSource(str(tmp_path))
  message = str(e.value)
  assert (f'{tmp_path}/train/dog/puppies holds 1 image(s) in a nested '
          'folder, which would be ignored') in message
  assert f'move them up into {tmp_path}/train/dog' in message
  assert f'{tmp_path}/train/stray.png is not in a class folder' in message
  # A nested folder without images (e.g. notes) is harmless.
  os.remove(tmp_path / 'train' / 'dog' / 'puppies' / 'small' / '0.png')
  os.remove(tmp_path / 'train' / 'stray.png')
  assert sources.FolderSource(str(tmp_path)).class_names == ['cat', 'dog']


BUILD_CHILD = '''
import sys
from mixer_jax.data.datasets import sources
source = sources.TfdsSource('digits', sys.argv[1])
print('SIZES', source.split_sizes(), flush=True)
'''


@pytest.mark.slow  # Two processes importing TensorFlow (~30 s).
def test_jobs_started_together_on_a_fresh_data_dir_both_get_the_data(
    tmp_path):
  # A seed sweep on a fresh machine: without the build lock, the loser of
  # the race said the data 'could not be prepared'.
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  data_dir = tmp_path / 'new' / 'tfds'  # Does not exist yet.
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  children = [subprocess.Popen([sys.executable, '-c', BUILD_CHILD,
                                str(data_dir)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
              for _ in range(2)]
  outputs = [child.communicate(timeout=300) for child in children]
  for child, (out, err) in zip(children, outputs):
    assert child.returncode == 0, err[-3000:]
    assert f"SIZES {{'train': {digits.NUM_TRAIN}, 'test': {digits.NUM_TEST}}}" in out or (
        f"SIZES {{'test': {digits.NUM_TEST}, 'train': {digits.NUM_TRAIN}}}"
        in out), out
    # Only the answer on stdout: TFDS's banners and bars are not there.
    assert out.count('\n') == 1, out
    assert '\x1b[' not in err  # No escape-code progress bars.
  errs = ''.join(err for _, err in outputs)
  assert errs.count('Preparing data set digits') == 1, errs[-3000:]
