"""Tests for mixer_jax.predict: class names, per-file results, the CLI."""

import csv
import io
import json
import os
import struct
import subprocess
import sys

import mixer_reference as ref
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import zlib

from mixer_jax import predict
from mixer_jax.training import errors
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


@pytest.mark.parametrize('batch_size', [1, 2, 32])
def test_classify_files_reports_bad_files_and_keeps_going(tmp_path, files,
                                                          batch_size):
  path, flat = _checkpoint(tmp_path, 1000)
  model, params = pretrained.load_pretrained(path)
  order = ['corrupt', 'photo', 'missing', 'grey', 'rgba']
  results = list(predict.classify_files(
      model, params, [files[k] for k in order], image_size=16,
      crop='resize_crop', batch_size=batch_size))
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
  assert proc.returncode == 1 and 'Known names' in proc.stderr


def test_directories_and_globs_expand_to_sorted_images(tmp_path, files):
  folder = tmp_path / 'folder'
  (folder / 'b_sub').mkdir(parents=True)
  for name in ['z.jpg', 'a.PNG', 'b_sub/c.jpeg', 'notes.txt']:
    (folder / name).write_bytes(b'x')
  (tmp_path / 'empty').mkdir()
  expected_folder = [str(folder / n) for n in ['a.PNG', 'b_sub/c.jpeg',
                                               'z.jpg']]
  assert predict.expand_inputs(
      [files['photo'], str(folder), str(tmp_path / '*.png'), '-']) == (
          [files['photo']] + expected_folder +
          [files['grey'], files['rgba'], '-'])
  assert predict.expand_inputs([files['missing']]) == [files['missing']]
  with pytest.raises(errors.UsageError, match='empty is a directory without '
                     r'images \(.jpg, '):
    predict.expand_inputs([str(tmp_path / 'empty')])
  with pytest.raises(errors.UsageError, match=r'No file matches .*/\*.gif'):
    predict.expand_inputs([str(tmp_path / '*.gif')])


def png_claiming(width, height, small_png):
  """`small_png` with a header claiming width x height: only its IHDR is
  changed (with a valid checksum), so only a header reader sees the size."""
  ihdr = b'IHDR' + struct.pack('>II', width, height) + small_png[24:29]
  return (small_png[:12] + ihdr + struct.pack('>I', zlib.crc32(ihdr)) +
          small_png[33:])


def test_images_above_the_pixel_limit_are_refused_before_decoding(
    tmp_path, files):
  path, _ = _checkpoint(tmp_path, 10)
  model, params = pretrained.load_pretrained(path)
  with open(files['grey'], 'rb') as f:
    huge = tmp_path / 'huge.png'  # 20000 x 20000, as the header says.
    huge.write_bytes(png_claiming(20000, 20000, f.read()))
  [refused, kept] = predict.classify_files(
      model, params, [str(huge), files['photo']], image_size=16)
  assert refused.error == (
      'image refused: 20000x20000 is 400 megapixels, above the limit of 100; '
      'raise it with --max_megapixels=400')
  assert kept.top and not kept.error
  [refused] = predict.classify_files(model, params, [files['photo']],
                                     image_size=16, max_megapixels=0.001)
  assert refused.error == ('image refused: 40x30 is 0.0012 megapixels, above '
                           'the limit of 0.001; raise it with '
                           '--max_megapixels=1')


def _run_predict(args, **kwargs):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'mixer_jax.predict'] + args,
                        cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300, **kwargs)


def test_json_and_csv_output_of_a_folder_and_stdin(tmp_path, files):
  path, _ = _checkpoint(tmp_path, 1000)
  model, params = pretrained.load_pretrained(path)
  folder = tmp_path / 'folder'
  folder.mkdir()
  for name in ['photo', 'corrupt', 'grey']:
    os.link(files[name], folder / os.path.basename(files[name]))
  inputs = sorted(str(p) for p in folder.iterdir()) + ['-']
  expected = list(predict.classify_files(
      model, params, inputs[:-1] + [files['photo']], image_size=16,
      top_k=3))
  names = predict.imagenet_class_names()
  with open(files['photo'], 'rb') as stdin:
    run = _run_predict([f'--checkpoint={path}', '--output=json', '--top_k=3',
                        '--batch_size=2', str(folder), '-'], stdin=stdin)
  assert run.returncode == 1, run.stderr[-3000:]  # The corrupt file.
  assert run.stderr.endswith(f'1 of 4 files failed: {folder}/corrupt.jpg\n')
  records = [json.loads(line) for line in run.stdout.splitlines()]
  assert [r['path'] for r in records] == inputs
  for record, result in zip(records, expected):
    if result.error:
      assert record == {'path': record['path'], 'error': result.error}
      assert record['error'].startswith('cannot decode image')
      continue
    assert [(t['class'], t['name']) for t in record['top']] == [
        (i, names[i]) for i, _ in result.top]
    np.testing.assert_allclose([t['probability'] for t in record['top']],
                               [p for _, p in result.top], rtol=1e-5)
  run = _run_predict([f'--checkpoint={path}', '--output=csv', '--top_k=2',
                      '--labels=none', files['grey']])
  assert run.returncode == 0, run.stderr[-3000:]
  [row] = list(csv.DictReader(io.StringIO(run.stdout)))
  assert list(row) == ['path', 'class_1', 'name_1', 'probability_1',
                       'class_2', 'name_2', 'probability_2', 'error']
  [result] = predict.classify_files(model, params, [files['grey']],
                                    image_size=16, top_k=2)
  assert row['path'] == files['grey'] and row['error'] == ''
  assert (int(row['class_1']), int(row['class_2'])) == tuple(
      i for i, _ in result.top)
  assert row['name_1'] == ''
  np.testing.assert_allclose(float(row['probability_1']), result.top[0][1],
                             rtol=1e-5)


def test_stdin_from_a_terminal_is_refused_before_loading(tmp_path):
  primary, terminal = os.openpty()
  try:
    run = _run_predict([f'--checkpoint={tmp_path / "never_read.npz"}', '-'],
                       stdin=terminal)
  finally:
    os.close(primary)
    os.close(terminal)
  assert run.returncode == 1
  assert run.stderr == ("UsageError: '-' reads one image from stdin, which "
                        'is a terminal here: pipe the image in (predict ... '
                        '- < image.png).\n')
