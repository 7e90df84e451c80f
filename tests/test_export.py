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
from test_any_checkpoint import trained  # pylint: disable=unused-import
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
  # Readable by others like every file, the weights too (not 0600).
  modes = {name: os.stat(out / name).st_mode & 0o777
           for name in os.listdir(out)}
  assert set(modes.values()) == {modes['config.json']}, modes
  # No local path: the checkpoint is named by its file name only.
  _assert_no_local_path(out, checkpoint)
  assert config['mixer_jax']['source'] == 'tiny.npz'
  # --weights=ema needs a training workdir; --push_to a Hub folder.
  with pytest.raises(checkpoint_checks.CheckpointError,
                     match='training workdirs only'):
    export.export(checkpoint, str(tmp_path / 'x'), 'onnx', weights='ema')
  with pytest.raises(errors.UsageError, match='--format=hub'):
    export.export(checkpoint, str(tmp_path / 'x'), 'onnx', push_to='me/m')


def _assert_no_local_path(folder, checkpoint):
  for path in pathlib.Path(folder).rglob('*'):
    if path.is_file() and path.suffix in ('.json', '.md', ''):
      text = path.read_text(errors='replace')
      assert os.path.dirname(checkpoint) not in text, path


def test_serving_info_names_no_local_path(checkpoint, tmp_path):
  out = tmp_path / 'stablehlo'
  info = _export(checkpoint, out, 'stablehlo')
  assert info['checkpoint'] == 'tiny.npz'
  _assert_no_local_path(out, checkpoint)


BLOCK_MODULE = '''
import runpy, sys

class Block:  # As if package argv[1] were not installed; runs argv[2].
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] == BLOCKED:
      raise ModuleNotFoundError(f'No module named {name!r}', name=name)

BLOCKED, PROGRAM = sys.argv.pop(1), sys.argv.pop(1)
sys.meta_path.insert(0, Block())
sys.argv[0] = PROGRAM
runpy.run_module(f'mixer_jax.{PROGRAM}', run_name='__main__', alter_sys=True)
'''


@pytest.mark.parametrize('fmt, module, extra, needs', [
    ('onnx', 'onnx', 'onnx', '--format=onnx needs the onnx package'),
    ('savedmodel', 'tensorflow', 'tf',
     'TensorFlow is not installed (it reads data and weight files)')])
def test_a_missing_optional_dependency_names_the_extra(checkpoint, tmp_path,
                                                       fmt, module, extra,
                                                       needs):
  out = tmp_path / fmt
  before = _files(tmp_path)
  proc = subprocess.run(
      [sys.executable, '-c', BLOCK_MODULE, module, 'export',
       f'--checkpoint={checkpoint}',
       f'--out={out}', f'--format={fmt}'],
      cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stderr
  assert proc.stderr.splitlines()[-1] == (
      f'Cannot export --checkpoint={checkpoint}: UsageError: {needs}: pip '
      f"install 'mixer_jax[{extra}]'. Nothing was written.")
  assert 'Traceback' not in proc.stderr
  assert not out.exists() and _files(tmp_path) == before


def _files(folder):
  return {str(p.relative_to(folder)): p.read_bytes()
          for p in pathlib.Path(folder).rglob('*') if p.is_file()}


def test_export_refuses_a_folder_it_would_mix_with(checkpoint, tmp_path):
  # A folder of the user's own files: refused, unless --overwrite.
  notes = tmp_path / 'notes'
  notes.mkdir()
  (notes / 'todo.txt').write_text('mine')
  with pytest.raises(errors.UsageError, match=(
      'is not empty .todo.txt. and holds no earlier --format=stablehlo '
      'export.*--overwrite')):
    export.export(checkpoint, str(notes), 'stablehlo')
  assert _files(notes) == {'todo.txt': b'mine'}
  export.export(checkpoint, str(notes), 'stablehlo', overwrite=True)
  assert sorted(_files(notes)) == ['model.jax_export', 'serving_info.json',
                                   'todo.txt']
  assert (notes / 'todo.txt').read_text() == 'mine'
  # An earlier export: the same format is replaced, another one refused.
  export.export(checkpoint, str(notes), 'stablehlo')
  before = _files(notes)
  assert sorted(before) == ['model.jax_export', 'serving_info.json',
                            'todo.txt']
  with pytest.raises(errors.UsageError, match='no earlier --format=hub'):
    export.export(checkpoint, str(notes), 'hub')
  assert _files(notes) == before
  # A training workdir (its checkpoints/ and run_info.json): always refused.
  workdir = tmp_path / 'run'
  (workdir / 'checkpoints').mkdir(parents=True)
  (workdir / 'run_info.json').write_text('{}')
  for overwrite in (False, True):
    with pytest.raises(errors.UsageError, match='is a training workdir'):
      export.export(checkpoint, str(workdir), 'hub', overwrite=overwrite)
  assert _files(workdir) == {'run_info.json': b'{}'}
  assert os.listdir(workdir / 'checkpoints') == []


def test_a_workdir_export_names_no_local_path(trained, tmp_path):
  workdir, _ = trained  # A real two-step training run (test_any_checkpoint).
  for fmt in ('hub', 'stablehlo'):
    export.export(str(workdir), str(tmp_path / fmt), fmt)
    _assert_no_local_path(tmp_path / fmt, str(workdir / 'x'))
  config = json.loads((tmp_path / 'hub' / 'config.json').read_text())
  assert config['mixer_jax']['source'] == f'{workdir.name} step 2'
  assert f'from `{workdir.name} step 2`' in (tmp_path / 'hub' /
                                             'README.md').read_text()
