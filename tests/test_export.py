"""Tests for mixer_jax.export: artifacts reloaded in a fresh process.

Each artifact is written by the command line, then loaded by a separate
Python process that imports neither mixer_jax nor Flax (StableHLO through
`jax.export.deserialize`, the SavedModel through `tf.saved_model.load`), and
its logits for two batch sizes are compared with the Flax model's.
"""

import json
import os
import pathlib
import subprocess
import sys

import mixer_reference as ref
import numpy as np
import pytest  # pylint: disable=unused-import

from mixer_jax import export
from mixer_jax.checkpointing import checkpoint_checks
from mixer_jax.data import preprocess
from mixer_jax.training import errors
from mixer_jax.weights import pretrained

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu')

RELOAD_STABLEHLO = '''
import sys, numpy as np, jax
exported = jax.export.deserialize(open(sys.argv[1], 'rb').read())
for name in sys.argv[2:]:
  np.save(name + '.out.npy', np.asarray(exported.call(np.load(name))))
'''

RELOAD_SAVEDMODEL = '''
import sys, numpy as np, tensorflow as tf
model = tf.saved_model.load(sys.argv[1])
for name in sys.argv[2:]:
  x = np.load(name)
  signature = model.signatures[
      'serving_default' if x.dtype == np.uint8 else 'serving_float']
  np.save(name + '.out.npy', signature(images=tf.constant(x))['logits'].numpy())
'''


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  flat = ref.official_checkpoint(0, blocks=1, classes=6)
  path = tmp_path_factory.mktemp('ckpt') / 'tiny.npz'
  np.savez(path, **flat)
  return str(path)


def _export(checkpoint, out, fmt, *extra):
  proc = subprocess.run(
      [sys.executable, '-m', 'mixer_jax.export', f'--checkpoint={checkpoint}',
       f'--out={out}', f'--format={fmt}', *extra],
      cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  return json.loads((out / 'serving_info.json').read_text())


def _reload(script, artifact, inputs, tmp_path):
  names = []
  for i, x in enumerate(inputs):
    names.append(str(tmp_path / f'in{i}.npy'))
    np.save(names[-1], x)
  proc = subprocess.run([sys.executable, '-c', script, str(artifact), *names],
                        cwd=tmp_path, env=ENV, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr
  return [np.load(n + '.out.npy') for n in names]


def _flax_logits(checkpoint, x):
  model, params = pretrained.load_pretrained(checkpoint)
  return np.asarray(model.apply({'params': params}, x))


def test_savedmodel_float_and_uint8(checkpoint, tmp_path):
  out = tmp_path / 'sm'
  info = _export(checkpoint, out, 'savedmodel')
  assert info['preprocessing_inside'] and info['eval_crop'] == 'resize_crop'
  rng = np.random.RandomState(0)
  # uint8 photos of another size: eval preprocessing runs inside the model.
  photos = [rng.randint(0, 256, (n, 20, 27, 3)).astype(np.uint8)
            for n in (1, 3)]
  floats = [ref.images(2, 1, 16), ref.images(3, 3, 16)]
  outputs = _reload(RELOAD_SAVEDMODEL, out, floats + photos, tmp_path)
  for x, got in zip(floats, outputs[:2]):
    np.testing.assert_allclose(got, _flax_logits(checkpoint, x), rtol=1e-5,
                               atol=1e-5)
  for x, got in zip(photos, outputs[2:]):
    pre = np.stack([preprocess.eval_image(
        image, 16, crop=info['eval_crop'],
        resize_size=info['eval_resize']).numpy() for image in x])
    assert got.shape == (len(x), 6)
    np.testing.assert_allclose(got, _flax_logits(checkpoint, pre), rtol=1e-4,
                               atol=1e-4)


RELOAD_ONNX = '''
import sys, numpy as np, onnxruntime
session = onnxruntime.InferenceSession(sys.argv[1],
                                       providers=['CPUExecutionProvider'])
for name in sys.argv[2:]:
  np.save(name + '.out.npy', session.run(['logits'], {'images': np.load(name)})[0])
'''


@pytest.mark.parametrize('fmt,file,seed,tolerance', [
    ('stablehlo', 'model.jax_export', 0, 1e-5),
    ('onnx', 'model.onnx', 4, 1e-4)])
def test_serialized_model_any_batch_size(checkpoint, tmp_path, fmt, file,
                                         seed, tolerance):
  # Reloaded in a fresh process, the file serves batches of 1 and 3 with the
  # Flax model's logits.
  if fmt == 'onnx':
    pytest.importorskip('onnxruntime')
  reload_script = {'stablehlo': RELOAD_STABLEHLO, 'onnx': RELOAD_ONNX}[fmt]
  out = tmp_path / fmt
  info = _export(checkpoint, out, fmt)
  if fmt == 'stablehlo':
    assert info['image_size'] == 16
  else:
    assert info['format'] == 'onnx'
  assert info['num_classes'] == 6
  inputs = [ref.images(seed, 1, 16), ref.images(seed + 1, 3, 16)]
  outputs = _reload(reload_script, out / file, inputs, tmp_path)
  for x, got in zip(inputs, outputs):
    assert got.shape == (len(x), 6)
    np.testing.assert_allclose(got, _flax_logits(checkpoint, x),
                               rtol=tolerance, atol=tolerance)


def test_hub_folder_from_the_command_line(checkpoint, tmp_path):
  # Offline, the folder is written and then the upload stops: one line
  # naming the reason, exit 1, no traceback.
  out = tmp_path / 'hub'
  proc = subprocess.run(
      [sys.executable, '-m', 'mixer_jax.export', f'--checkpoint={checkpoint}',
       f'--out={out}', '--format=hub', '--push_to=me/model'],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(ENV, HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf')))
  assert proc.returncode == 1, proc.stderr
  assert 'HF_HUB_OFFLINE' in proc.stderr and 'Traceback' not in proc.stderr
  assert sorted(os.listdir(out)) == [
      'Mixer-custom_P4_N1_C32_DS16_DC64.npz', 'README.md', 'config.json',
      'model.safetensors']
  config = json.loads((out / 'config.json').read_text())
  assert config['num_classes'] == 6
  assert config['mixer_jax']['gelu_approximate'] is True
  # --weights=ema needs a training workdir; --push_to a Hub folder.
  with pytest.raises(checkpoint_checks.CheckpointError,
                     match='training workdirs only'):
    export.export(checkpoint, str(tmp_path / 'x'), 'onnx', weights='ema')
  with pytest.raises(errors.UsageError, match='--format=hub'):
    export.export(checkpoint, str(tmp_path / 'x'), 'onnx', push_to='me/m')
