"""Tests for mixer_jax.predict: class names, per-file results, the CLI."""

import os
import subprocess
import sys

import mixer_reference as ref
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from mixer_jax import predict
from mixer_jax.data import preprocess
from mixer_jax.weights import pretrained
from mixer_jax.weights import registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_imagenet_class_names_in_standard_order():
  names = predict.imagenet_class_names()
  assert len(names) == 1000
  assert names[:3] == ['tench', 'goldfish', 'great white shark']
  assert (names[281], names[291], names[409], names[999]) == (
      'tabby', 'lion', 'analog clock', 'toilet tissue')
  assert all(n and n == n.strip() for n in names)


# ImageNet-1k label -> (WordNet id, readable name), as published with the
# ILSVRC-2012 synsets (the label order is the sorted WordNet ids).
IMAGENET_LABELS = {0: ('n01440764', 'tench'), 1: ('n01443537', 'goldfish'),
                   207: ('n02099601', 'golden retriever'),
                   281: ('n02123045', 'tabby'),
                   999: ('n15075141', 'toilet tissue')}


def tfds_imagenet_label_ids(tmp_path):
  """The names a workdir trained on TFDS imagenet2012 brings: WordNet ids."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder('imagenet2012', data_dir=str(tmp_path))
  return list(builder.info.features['label'].names)  # No data needed.


def test_wordnet_ids_print_as_imagenet_names(tmp_path):
  ids = tfds_imagenet_label_ids(tmp_path)
  assert {i: ids[i] for i in IMAGENET_LABELS} == {
      i: wnid for i, (wnid, _) in IMAGENET_LABELS.items()}
  result = predict.Prediction('dog.jpg', [(207, 0.7), (999, 0.2), (0, 0.1)])
  text = predict.format_prediction(result, ids)
  lines = text.splitlines()
  assert lines[1].endswith('  207 golden retriever'), text
  assert lines[2].endswith('  999 toilet tissue'), text
  assert lines[3].endswith('    0 tench'), text
  assert 'n0' not in text and 'n1' not in text
  readable = predict.readable_class_names(ids)
  assert {i: readable[i] for i in IMAGENET_LABELS} == {
      i: name for i, (_, name) in IMAGENET_LABELS.items()}
  assert ids[207] == 'n02099601'  # The ids themselves are left unchanged.


def test_other_names_are_kept(tmp_path):
  ids = tfds_imagenet_label_ids(tmp_path)
  shuffled = ids[1:] + ids[:1]  # Not the standard order: no mapping.
  assert predict.readable_class_names(shuffled) == shuffled
  assert predict.readable_class_names(ids[:10]) == ids[:10]
  digits = [str(i) for i in range(10)]
  assert predict.readable_class_names(digits) == digits
  assert predict.readable_class_names(None) is None
  result = predict.Prediction('x.png', [(3, 1.0)])
  assert predict.format_prediction(result, digits).endswith('    3 3')


def test_class_names_choice():
  entry_21k = registry.get('imagenet21k/Mixer-B_16')
  entry_1k = registry.get('gsam/Mixer-S_8')
  assert predict.class_names('auto', 21843, entry_21k) is None
  assert predict.class_names('auto', 1000, entry_1k)[0] == 'tench'
  assert predict.class_names('auto', 1000, None)[1] == 'goldfish'
  assert predict.class_names('auto', 10, None) is None
  assert predict.class_names('none', 1000, None) is None
  with pytest.raises(ValueError, match='has 1000 names but the model has 10'):
    predict.class_names('imagenet2012', 10, None)


@pytest.fixture
def files(tmp_path):
  rng = np.random.RandomState(0)
  paths = {}
  paths['photo'] = str(tmp_path / 'photo.jpg')
  Image.fromarray(rng.randint(0, 256, (30, 40, 3), np.uint8)).save(
      paths['photo'])
  paths['grey'] = str(tmp_path / 'grey.png')
  Image.fromarray(rng.randint(0, 256, (23, 17), np.uint8)).save(paths['grey'])
  paths['rgba'] = str(tmp_path / 'rgba.png')
  Image.fromarray(rng.randint(0, 256, (64, 20, 4), np.uint8)).save(
      paths['rgba'])
  paths['corrupt'] = str(tmp_path / 'corrupt.jpg')
  with open(paths['corrupt'], 'wb') as f:
    f.write(b'\xff\xd8\xff\xe0' + rng.bytes(200))
  paths['missing'] = str(tmp_path / 'missing.jpg')
  return paths


def _checkpoint(tmp_path, classes):
  flat = ref.official_checkpoint(0, classes=classes)
  path = str(tmp_path / f'c{classes}.npz')
  np.savez(path, **flat)
  return path, flat


def test_classify_files_reports_bad_files_and_keeps_going(tmp_path, files):
  path, flat = _checkpoint(tmp_path, 1000)
  model, params = pretrained.load_pretrained(path)
  order = ['corrupt', 'photo', 'missing', 'grey', 'rgba']
  results = predict.classify_files(model, params, [files[k] for k in order],
                                   image_size=16, crop='resize_crop')
  assert [r.path for r in results] == [files[k] for k in order]
  assert [bool(r.error) for r in results] == [True, False, True, False, False]
  assert results[0].error.startswith('cannot decode image: ')
  assert results[2].error.startswith('cannot read image: ')
  for result in results:
    if result.error:
      continue
    data = tf.io.read_file(result.path)
    x = preprocess.eval_image(data, 16, crop='resize_crop', resize_size=18)
    logits = ref.forward(flat, x.numpy()[None])[0]
    scores = np.exp(logits - logits.max())
    scores /= scores.sum()
    expected = np.argsort(-scores)[:5]
    assert [i for i, _ in result.top] == list(expected)
    np.testing.assert_allclose([s for _, s in result.top], scores[expected],
                               rtol=1e-3, atol=1e-6)
  text = predict.format_prediction(results[1], predict.imagenet_class_names())
  top_index = results[1].top[0][0]
  assert predict.imagenet_class_names()[top_index] in text.splitlines()[1]


def test_indices_for_other_heads(tmp_path, files):
  path, _ = _checkpoint(tmp_path, 10)
  model, params = pretrained.load_pretrained(path)
  [result] = predict.classify_files(model, params, [files['photo']],
                                    image_size=16, crop='resize', top_k=3)
  assert len(result.top) == 3
  lines = predict.format_prediction(result, None).splitlines()
  assert lines[1].split()[-1] == str(result.top[0][0])


def test_command_line(tmp_path, files):
  path, _ = _checkpoint(tmp_path, 1000)
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, '-m', 'mixer_jax.predict', f'--checkpoint={path}',
       files['photo'], files['corrupt'], files['grey']],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stderr
  out = proc.stdout
  assert f'{files["photo"]}:\n  1. ' in out
  assert f'{files["corrupt"]}: ERROR cannot decode image' in out
  assert f'{files["grey"]}:\n  1. ' in out
  assert '1 of 3 files failed' in proc.stderr
  names = set(predict.imagenet_class_names())
  ranked = [line for line in out.splitlines() if line.startswith('  ')]
  assert len(ranked) == 10
  assert all(line.split(maxsplit=3)[3] in names for line in ranked)
  proc = subprocess.run(
      [sys.executable, '-m', 'mixer_jax.predict',
       f'--checkpoint={tmp_path / "absent.npz"}', files['photo']],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and 'Known names' in proc.stderr
