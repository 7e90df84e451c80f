"""Tests for mixer_jax.weights.any_checkpoint: one notion of "a checkpoint".

A training workdir (trained for two steps on a tiny folder data set, so its
class names come from the folder names) is used by predict, evaluate and
`any_checkpoint.load` with no other information; weight files of every kind
load with the preprocessing that goes with them.
"""

import functools
import os
import pathlib
import subprocess
import sys

from flax import traverse_util
import jax
import mixer_reference as ref
import numpy as np
import optax
from PIL import Image
import pytest

from configs import quickstart
from mixer_jax import model_from_config
from mixer_jax.checkpointing import checkpoints
from mixer_jax.checkpointing import fingerprint
from mixer_jax.training import train_steps
from mixer_jax.weights import any_checkpoint
from mixer_jax.weights import official_format
from mixer_jax.weights import pretrained
from mixer_jax.weights import registry
from mixer_jax.weights import run_info
from mixer_jax.weights import timm_format

REPO = pathlib.Path(__file__).resolve().parents[1]
CLASSES = ('cat', 'dog', 'zebra')


def _image(path, seed, color):
  rng = np.random.RandomState(seed)
  array = np.clip(rng.randint(0, 60, (12, 10, 3)) + np.array(color), 0, 255)
  Image.fromarray(array.astype(np.uint8)).save(path)


def _folder(root):
  """root/{train,test}/{cat,dog,zebra}/*.png: colour tells the class."""
  colors = {'cat': (190, 0, 0), 'dog': (0, 190, 0), 'zebra': (0, 0, 190)}
  for split, count in (('train', 6), ('test', 2)):
    for name in CLASSES:
      folder = root / split / name
      folder.mkdir(parents=True)
      for i in range(count):
        _image(folder / f'{i}.png', hash((split, name, i)) % 1000,
               colors[name])
  return root


def _tiny_config(**overrides):
  config = quickstart.get_config()
  config.model.num_blocks = 1
  config.model.hidden_dim = 16
  config.model.tokens_mlp_dim = 8
  config.model.channels_mlp_dim = 32
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A real two-step training run on a folder data set."""
  from mixer_jax.training import trainer  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('data')
  config = _tiny_config(
      dataset='folder', folder=str(_folder(root)), train_split='train',
      eval_split='test', batch_size=8, num_train_steps=2, warmup_steps=1,
      eval_every_steps=2, checkpoint_every_steps=1, log_every_steps=1,
      shuffle_buffer=20)
  workdir = tmp_path_factory.mktemp('run')
  trainer.train_and_evaluate(config, str(workdir))
  return workdir, root


def test_workdir_describes_itself(trained):
  workdir, _ = trained
  info = run_info.read_run_info(str(workdir))
  assert info['class_names'] == list(CLASSES)  # The folder names.
  assert info['num_classes'] == 3
  assert info['config'].model.hidden_dim == 16
  loaded = any_checkpoint.load(str(workdir))
  assert (loaded.kind, loaded.step, loaded.image_size, loaded.eval_crop) == (
      'workdir', 2, 8, 'resize')
  assert loaded.class_names == list(CLASSES)
  assert loaded.num_classes == 3
  # step=K, the checkpoints directory and a step directory give that step.
  first = any_checkpoint.load(str(workdir), step=1)
  same = any_checkpoint.load(str(workdir / 'checkpoints' / '1'))
  assert (first.step, same.step) == (1, 1)
  x = ref.images(0, 2, 8)
  out = {name: np.asarray(c.model.apply({'params': c.params}, x))
         for name, c in (('2', loaded), ('1', first), ('1b', same))}
  np.testing.assert_array_equal(out['1'], out['1b'])
  assert np.abs(out['1'] - out['2']).max() > 0  # Step 2 is another state.
  features_model, features_params = loaded.features()
  assert 'head' not in features_params
  assert features_model.apply({'params': features_params}, x).shape == (2, 16)
  with pytest.raises(ValueError, match='step 1 but step=2'):
    any_checkpoint.load(str(workdir / 'checkpoints' / '1'), step=2)
  # A workdir is a checkpoint for config.init_from and load_pretrained too.
  model, params = pretrained.load_pretrained(str(workdir))
  np.testing.assert_allclose(model.apply({'params': params}, x), out['2'],
                             rtol=1e-6, atol=1e-6)
  target = model_from_config.create_model(info['config'], 5)
  fresh = jax.tree.map(np.asarray, target.init(jax.random.PRNGKey(3), x)[
      'params'])
  filled = traverse_util.flatten_dict(
      pretrained.init_from_checkpoint(str(workdir), fresh), sep='/')
  np.testing.assert_array_equal(filled['stem/kernel'],
                                params['stem']['kernel'])
  assert filled['head/kernel'].shape == (16, 5)  # Fresh head for 5 classes.


def test_loading_is_read_only(trained):
  workdir, _ = trained

  def listing():
    return sorted((str(p), p.stat().st_mtime_ns) for p in workdir.rglob('*'))

  before = listing()
  any_checkpoint.load(str(workdir))
  assert listing() == before


def test_predict_with_just_the_workdir(trained, tmp_path):
  workdir, root = trained
  images = [str(root / 'test' / name / '0.png') for name in CLASSES]
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, '-m', 'mixer_jax.predict', f'--checkpoint={workdir}',
       '--top_k=3'] + images,
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  ranked = [line.split() for line in proc.stdout.splitlines()
            if line.startswith('  ')]
  assert len(ranked) == 9
  assert {r[-1] for r in ranked} == set(CLASSES)  # Names, not indices.


def test_evaluate_with_the_saved_config(trained):
  from mixer_jax import evaluate  # pylint: disable=g-import-not-at-top
  workdir, _ = trained
  config = run_info.read_run_info(str(workdir))['config']
  result = evaluate.evaluate(config, str(workdir))
  assert result['examples'] == 6
  # A second way: the loaded model applied to each test image alone (the
  # run's eval preprocessing, no batching, padding, masks or devices),
  # scored by hand; labels are the sorted folder names.
  from mixer_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  loaded = any_checkpoint.load(str(workdir))
  _, root = trained
  hits = []
  for label, name in enumerate(CLASSES):
    for path in sorted((root / 'test' / name).glob('*.png')):
      image = preprocess.eval_image(path.read_bytes(), 8, crop='resize')
      logits = loaded.model.apply({'params': loaded.params},
                                  np.asarray(image)[None])
      hits.append(int(np.argmax(logits)) == label)
  assert len(hits) == 6
  assert result['top1'] == pytest.approx(np.mean(hits))


def test_workdir_without_run_info(tmp_path):
  (tmp_path / 'checkpoints').mkdir()
  with pytest.raises(registry.CheckpointNotFoundError, match='run_info.json'):
    any_checkpoint.load(str(tmp_path))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(registry.CheckpointNotFoundError,
                     match='not a mixer_jax training workdir'):
    any_checkpoint.load(str(tmp_path / 'empty'))


def test_saved_state_without_training(tmp_path):
  """A state saved the way train.py saves it loads with its own names."""
  config = _tiny_config()
  model = model_from_config.create_model(config, 10)
  state = jax.jit(functools.partial(
      train_steps.create_train_state, model, optax.adam(1e-3),
      image_size=config.image_size))(jax.random.PRNGKey(0))
  leaves, tree = jax.tree.flatten(state.params)
  leaves = [x + 0.3 * jax.random.normal(jax.random.PRNGKey(i), x.shape)
            for i, x in enumerate(leaves)]
  state = state.replace(params=jax.tree.unflatten(tree, leaves))
  ckpt = checkpoints.Checkpointer(
      tmp_path / 'checkpoints', keep=2, keep_best=False,
      fingerprint=fingerprint.model_fingerprint(config, 10))
  ckpt.save(7, state.replace(step=np.int32(7)))
  ckpt.close()
  run_info.save_run_info(str(tmp_path), config, 10)
  loaded = any_checkpoint.load(str(tmp_path))
  assert loaded.class_names == [str(i) for i in range(10)]  # digits' labels.
  x = ref.images(1, 3, 8)
  np.testing.assert_allclose(
      loaded.model.apply({'params': loaded.params}, x),
      model.apply({'params': state.params}, x), rtol=1e-6, atol=1e-6)


def test_weight_files_of_every_kind(tmp_path, monkeypatch):
  flat = ref.official_checkpoint(0, classes=1000)
  npz = tmp_path / 'ckpt.npz'
  np.savez(npz, **flat)
  st = tmp_path / 'ckpt.safetensors'
  timm_format.export_timm(traverse_util.unflatten_dict(flat, sep='/'), st)
  # A registry name resolved from the local cache (no download).
  monkeypatch.setenv(registry.CACHE_ENV, str(tmp_path / 'cache'))
  entry = registry.get('gsam/Mixer-S_8')
  os.makedirs(os.path.dirname(registry.local_path(entry)))
  np.savez(registry.local_path(entry), **flat)  # Any content: shapes differ.
  x = ref.images(2, 2, 16)
  want = ref.forward(flat, x)
  for spec, kind in ((str(npz), 'official'), (str(st), 'timm')):
    loaded = any_checkpoint.load(spec)
    assert loaded.kind == kind
    assert (loaded.image_size, loaded.eval_crop) == (16, 'resize_crop')
    assert loaded.eval_resize == 18  # 16 * 256 / 224 and 16 / 0.875.
    np.testing.assert_allclose(loaded.model.apply({'params': loaded.params},
                                                  x), want, rtol=1e-4,
                               atol=1e-4)
  # The registry entry is checked against the file: a mismatch is reported.
  with pytest.raises(official_format.PretrainedError, match='should hold'):
    any_checkpoint.load('gsam/Mixer-S_8')
  with pytest.raises(ValueError, match='training workdirs only'):
    any_checkpoint.load(str(npz), step=3)
  features = any_checkpoint.load(str(npz), num_classes=0)
  assert not features.model.num_classes and 'head' not in features.params


def test_an_exported_hub_folder_is_a_checkpoint(trained, tmp_path):
  workdir, root = trained
  out = tmp_path / 'hub'
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, '-m', 'mixer_jax.export', f'--checkpoint={workdir}',
       f'--out={out}', '--format=hub'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  original = any_checkpoint.load(str(workdir))
  folder = any_checkpoint.load(str(out))
  assert folder.class_names == original.class_names == list(CLASSES)
  assert folder.num_classes == 3 and folder.image_size == 8
  # The run's eval preprocessing (a plain resize) comes back with it.
  assert (folder.eval_crop, original.eval_crop) == ('resize', 'resize')
  x = ref.images(0, 3, 8)
  np.testing.assert_array_equal(
      folder.model.apply({'params': folder.params}, x),
      original.model.apply({'params': original.params}, x))
  # evaluate reads it as a weight file, not as a training workdir.
  from mixer_jax.weights import workdir_checkpoint  # pylint: disable=g-import-not-at-top
  assert not workdir_checkpoint.is_directory(str(out))
  proc = subprocess.run(
      [sys.executable, '-m', 'mixer_jax.predict', f'--checkpoint={out}',
       '--top_k=1', str(root / 'test' / 'dog' / '0.png')],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.split()[-1] in CLASSES  # Names from its config.json.


def test_a_damaged_hub_config_is_an_error_naming_it(tmp_path):
  flat = ref.official_checkpoint(0, classes=10)
  timm_format.export_timm(traverse_util.unflatten_dict(flat, sep='/'),
                          tmp_path / 'model.safetensors')
  config = tmp_path / 'config.json'
  config.write_text('{"num_classes": 10, ')
  for spec in (tmp_path, tmp_path / 'model.safetensors'):
    with pytest.raises(official_format.PretrainedError) as error:
      any_checkpoint.load(str(spec))
    assert str(error.value).startswith(
        f'{config} cannot be read as JSON (JSONDecodeError: Expecting '
        'property name enclosed in double quotes: line 1 column 21 (char '
        '20)); repair it, or move it away')


def _files_of_every_kind(tmp_path):
  """{name: path} of weight files and others, each under a wrong suffix."""
  flat = ref.official_checkpoint(0, classes=10)
  st = tmp_path / 'real.safetensors'
  timm_format.export_timm(traverse_util.unflatten_dict(flat, sep='/'), st)
  npz = tmp_path / 'real.npz'
  np.savez(npz, **flat)
  files = {'safetensors': tmp_path / 'st_named.npz',
           'npz': tmp_path / 'npz_named.safetensors',
           'png': tmp_path / 'png_named.npz',
           'jax_export': tmp_path / 'model_jax_export.npz'}
  files['safetensors'].write_bytes(st.read_bytes())
  files['npz'].write_bytes(npz.read_bytes())
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / 'x.png')
  files['png'].write_bytes((tmp_path / 'x.png').read_bytes())
  exported = jax.export.export(jax.jit(lambda v: v * 2))(
      jax.ShapeDtypeStruct((2,), np.float32))
  files['jax_export'].write_bytes(exported.serialize())
  return flat, files


def test_a_files_kind_is_read_from_its_bytes(tmp_path):
  flat, files = _files_of_every_kind(tmp_path)
  for kind, path in files.items():
    assert official_format.file_kind(path) == kind, path
  x = ref.images(1, 2, 16)
  for kind in ('safetensors', 'npz'):  # Loaded by what they are.
    loaded = any_checkpoint.load(str(files[kind]))
    np.testing.assert_allclose(loaded.model.apply({'params': loaded.params},
                                                  x), ref.forward(flat, x),
                               rtol=1e-4, atol=1e-4)
  expected = {
      'png': 'is a PNG image, not a weight file; images are classified with '
             '`python -m mixer_jax.predict --checkpoint=WEIGHTS IMAGE`.',
      'jax_export': 'is a jax.export (StableHLO) model for serving, as '
                    '`mixer_jax.export --format=stablehlo` writes it, not a '
                    'weight file; load it with jax.export.deserialize; here '
                    'pass the checkpoint it was exported from.'}
  for kind, message in expected.items():
    with pytest.raises(official_format.PretrainedError) as error:
      any_checkpoint.load(str(files[kind]))
    assert str(error.value) == f'{files[kind]} {message}'
  garbage = tmp_path / 'garbage.safetensors'
  garbage.write_bytes(b'\x00' * 64)
  with pytest.raises(official_format.PretrainedError,
                     match='is neither an .npz archive nor a safetensors'):
    any_checkpoint.load(str(garbage))
