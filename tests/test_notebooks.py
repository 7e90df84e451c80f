"""The Colab notebooks: committed clean, and run end to end offline on a CPU.

Each notebook's `parameters` cell holds the Colab defaults (real checkpoint,
real data set, TPU-sized model). Here papermill replaces it with a tiny
variant, the built-in `digits` data and a random official-format checkpoint
that the notebook writes into a temporary directory, then executes every cell
in a Jupyter kernel running this interpreter (`python3` kernel spec, which
jupyter_client starts with `sys.executable`, i.e. the `.venv` of CI). Any cell
that raises fails the test.

Run just these:  .venv/bin/python -m pytest -q tests/test_notebooks.py
Strip outputs before committing a notebook run by hand, and write setup.py's
`URL` (the repository) into the notebooks' badges and install cells:
  .venv/bin/python tests/test_notebooks.py notebooks/*.ipynb
"""

import ast
import json
import os
import pathlib
import re

import nbformat
import numpy as np
import papermill
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / 'notebooks'
NAMES = ('quickstart.ipynb', 'finetune.ipynb')


def repository_url():
  """setup.py's `URL`: the one place the repository's address is named."""
  tree = ast.parse((REPO / 'setup.py').read_text())
  [value] = [node.value.value for node in tree.body
             if isinstance(node, ast.Assign) and node.targets[0].id == 'URL']
  return value


# A GitHub address in a notebook: the badge's `github/OWNER/NAME` or the
# install cell's `github.com/OWNER/NAME`.
GITHUB_ADDRESS = re.compile(r'(github(?:\.com)?/)[\w.-]+/[\w.-]+')


def with_repository(nb, url):
  """`nb` with every GitHub address pointing at repository `url`."""
  repository = url.removeprefix('https://github.com/')
  for cell in nb.cells:
    cell.source = GITHUB_ADDRESS.sub(lambda m: m.group(1) + repository,
                                     cell.source)
  return nb


# Colab opens a notebook straight from GitHub at this address.
COLAB_URL = ('https://colab.research.google.com/github/{repository}/blob/main/'
             'notebooks/{name}')

# A model small enough to train for a few steps on a shared 2-core CPU:
# 16x16 images in 4x4 patches give 16 tokens.
TINY_MODEL = {'num_blocks': 2, 'hidden_dim': 32, 'tokens_mlp_dim': 16,
              'channels_mlp_dim': 64}
TINY_SIZE = 16


def strip_outputs(nb):
  """Removes everything an execution adds: outputs, counts, papermill cells.

  Args:
    nb: a notebook (nbformat NotebookNode), changed in place.

  Returns:
    `nb`.
  """
  nb.cells = [c for c in nb.cells
              if 'injected-parameters' not in c.metadata.get('tags', [])]
  for cell in nb.cells:
    if cell.cell_type == 'code':
      cell.outputs = []
      cell.execution_count = None
    for key in ('execution', 'papermill'):
      cell.metadata.pop(key, None)
    if cell.metadata.get('tags') == []:  # Papermill adds empty tag lists.
      del cell.metadata['tags']
  for key in ('papermill', 'widgets'):
    nb.metadata.pop(key, None)
  return nb


def _read(name):
  return nbformat.read(NOTEBOOKS / name, as_version=4)


def _code(cell):
  """Cell source with IPython escapes (`!cmd`, `%magic`) made plain Python."""
  return re.sub(r'^(\s*)[!%].*$', r'\1pass', cell.source, flags=re.M)


def _parameters_cell(nb):
  tagged = [c for c in nb.cells if 'parameters' in c.metadata.get('tags', [])]
  assert len(tagged) == 1, 'need exactly one cell tagged "parameters"'
  return tagged[0]


def _parameter_defaults(nb):
  """Name -> default value of every assignment in the parameters cell."""
  tree = ast.parse(_parameters_cell(nb).source)
  defaults = {}
  for node in tree.body:
    assert isinstance(node, ast.Assign), ast.dump(node)
    (target,) = node.targets
    defaults[target.id] = ast.literal_eval(node.value)
  return defaults


def _offline_parameters(name, tmp_path):
  """The overrides that make `name` run offline on the CPU."""
  if name == 'quickstart.ipynb':
    return {
        'install': False,
        'checkpoint': str(tmp_path / 'random_mixer_s4.npz'),
        'random_checkpoint_model': dict(variant='S_4', **TINY_MODEL),
        'image_size': TINY_SIZE,
        'image_urls': [p.as_uri() for p in _write_digit_jpegs(tmp_path)],
        'batch_per_device': 2,
        'timing_repeats': 2,
    }
  return {
      'install': False,
      'init_from': str(tmp_path / 'random_mixer_s4.npz'),
      'make_random_checkpoint': True,
      'variant': 'S_4',
      'dataset': 'digits',
      'image_size': TINY_SIZE,
      'batch_size': 16,
      'num_train_steps': 6,
      'eval_every_steps': 3,
      'workdir': str(tmp_path / 'workdir'),
      'config_overrides': {
          **{f'model.{k}': v for k, v in TINY_MODEL.items()},
          'warmup_steps': 2, 'grad_accum_steps': 2, 'log_every_steps': 1,
          'shuffle_buffer': 100},
  }


def _write_digit_jpegs(tmp_path, count=3):
  """Writes a few of scikit-learn's 8x8 digits as 48x64 RGB JPEG files."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  digits = datasets.load_digits()
  paths = []
  for i in range(count):
    gray = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
    rgb = np.stack([gray, 255 - gray, gray // 2], axis=-1)  # Not square:
    image = Image.fromarray(rgb).resize((64, 48))  # exercises the crop.
    paths.append(tmp_path / f'digit_{i}.jpg')
    image.save(paths[-1])
  return paths


def _stdout(nb):
  text = []
  for cell in nb.cells:
    for output in cell.get('outputs', []):
      if output.get('name') == 'stdout':
        text.append(output['text'])
  return ''.join(text)


def _images(nb):
  return [o for c in nb.cells for o in c.get('outputs', [])
          if 'image/png' in o.get('data', {})]


# ----------------------------------------------------- Committed notebooks.


@pytest.mark.parametrize('name', NAMES)
def test_committed_without_outputs(name):
  nb = _read(name)
  nbformat.validate(nb)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == 'code':
      assert cell.outputs == [], (
          f'{name} cell {i} has outputs; clear them before committing: '
          f'python tests/test_notebooks.py notebooks/{name}')
      assert cell.execution_count is None, f'{name} cell {i} execution_count'
  # Nothing else an execution leaves behind either.
  assert nb == strip_outputs(_read(name)), f'{name} is not stripped'


@pytest.mark.parametrize('name', NAMES)
def test_opens_with_text_and_colab_link(name):
  nb = _read(name)
  first = nb.cells[0]
  assert first.cell_type == 'markdown'
  assert first.source.startswith('# ')
  repository = repository_url().removeprefix('https://github.com/')
  assert f'({COLAB_URL.format(repository=repository, name=name)})' in (
      first.source)
  assert 'colab-badge.svg' in first.source
  # Every GitHub address in the notebook is setup.py's.
  text = (NOTEBOOKS / name).read_text()
  for match in GITHUB_ADDRESS.finditer(text):
    assert match.group(0) in (f'github.com/{repository}',
                              f'github/{repository}'), (
        f'{match.group(0)} is not setup.py\'s URL; run: python '
        f'tests/test_notebooks.py notebooks/{name}')


def test_the_repository_is_named_in_setup_py_only(tmp_path):
  # Publishing under another account: change setup.py's URL and run this
  # file's command; every address follows, the badge opens the new one.
  nb = with_repository(_read('quickstart.ipynb'),
                       'https://github.com/someone/mixer-fork')
  text = json.dumps(nb)
  assert ('https://colab.research.google.com/github/someone/mixer-fork/blob/'
          'main/notebooks/quickstart.ipynb') in text
  assert "'git+https://github.com/someone/mixer-fork'" in nb.cells[2].source
  assert 'OWNER' not in text
  assert _read('quickstart.ipynb') == with_repository(
      _read('quickstart.ipynb'), repository_url())  # Committed as set.


@pytest.mark.parametrize('name', NAMES)
def test_every_code_cell_is_valid_python(name):
  for i, cell in enumerate(_read(name).cells):
    if cell.cell_type == 'code':
      try:
        ast.parse(_code(cell))
      except SyntaxError as e:
        raise AssertionError(f'{name} cell {i}: {e}') from e


@pytest.mark.parametrize('name', NAMES)
def test_parameters_cell_defaults_are_colab_settings(name, tmp_path):
  nb = _read(name)
  defaults = _parameter_defaults(nb)
  assert defaults['install'] is True
  # The offline run overrides only parameters the notebook defines, so a typo
  # in a name cannot silently leave the Colab default in place.
  unknown = set(_offline_parameters(name, tmp_path)) - set(defaults)
  assert not unknown, f'{name} has no parameters {sorted(unknown)}'
  if name == 'quickstart.ipynb':
    assert defaults['checkpoint'] == 'imagenet1k/Mixer-B_16'
    assert defaults['image_size'] == 224
    assert not defaults['random_checkpoint_model']
    assert all(u.startswith('https://') for u in defaults['image_urls'])
  else:
    assert defaults['init_from'] == 'imagenet1k/Mixer-B_16'
    assert defaults['make_random_checkpoint'] is False
    assert defaults['dataset'] == 'cifar10'
    assert defaults['variant'] == 'B_16'
    assert defaults['config_overrides'] == {}
    assert defaults['image_size'] == 224
  # The install cell is the only one with shell commands (the only one that
  # reaches the network) and is skipped when `install` is False.
  shell = [c for c in nb.cells if c.cell_type == 'code' and
           re.search(r'^\s*[!%]', c.source, flags=re.M)]
  assert len(shell) == 1
  assert shell[0].source.startswith('if install:\n')
  assert 'pip install' in shell[0].source


# ------------------------------------------- The install cell and TensorFlow.

# Distributions that install the `tensorflow` import package; two of them in
# one environment overwrite each other's files. The environment's own
# providers (importlib.metadata) are added to this list in the test.
TF_DISTRIBUTIONS = {'tensorflow', 'tensorflow-cpu', 'tensorflow-gpu',
                    'tensorflow-intel', 'tensorflow-macos',
                    'tensorflow-aarch64', 'intel-tensorflow', 'tf-nightly',
                    'tf-nightly-cpu', 'tf-nightly-gpu'}

# Runs an install cell (as IPython translates it) and prints the shell
# commands it would run, expanded as IPython expands `!cmd {name}`.
_RECORD_COMMANDS = r"""
import json, string, sys
commands = []
class _Shell:
  def system(self, cmd):
    frame = sys._getframe(1)
    commands.append(string.Formatter().vformat(
        cmd, (), {**frame.f_globals, **frame.f_locals}))
  def run_line_magic(self, name, line):
    pass
def get_ipython():
  return _Shell()
namespace = json.loads(sys.argv[1])
namespace['get_ipython'] = get_ipython
exec(sys.argv[2], namespace)
print(json.dumps(commands))
"""


def _install_commands(name, *, python_flags=()):
  """The shell commands the install cell runs with the Colab parameters.

  The cell runs in a real interpreter: `python_flags=('-S',)` starts this
  Python without site-packages, i.e. an environment without TensorFlow.
  """
  from IPython.core import inputtransformer2  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  nb = _read(name)
  [cell] = [c for c in nb.cells if c.cell_type == 'code' and
            c.source.startswith('if install:\n')]
  code = inputtransformer2.TransformerManager().transform_cell(cell.source)
  params = _parameter_defaults(nb)
  proc = subprocess.run(
      [sys.executable, *python_flags, '-c', _RECORD_COMMANDS,
       json.dumps(params), code], capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  return [c for c in json.loads(proc.stdout) if re.search(r'\bpip install\b',
                                                          c)]


def _project_requirements(tmp_path):
  """mixer_jax's requirements as setuptools writes them from setup.py."""
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from packaging.requirements import Requirement  # pylint: disable=g-import-not-at-top
  proc = subprocess.run(
      [sys.executable, 'setup.py', '-q', 'egg_info', '--egg-base',
       str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  dist = importlib.metadata.PathDistribution(tmp_path / 'mixer_jax.egg-info')
  return [Requirement(r) for r in dist.requires]


def _requested(requirements, extras):
  """The requirements that apply on this platform with `extras`."""
  return [r for r in requirements if r.marker is None or any(
      r.marker.evaluate({'extra': e}) for e in set(extras) | {''})]


def _project_extras(command):
  """Extras of mixer_jax requested by one `pip install ...` command."""
  import shlex  # pylint: disable=g-import-not-at-top
  from packaging.requirements import Requirement  # pylint: disable=g-import-not-at-top
  args = shlex.split(command)
  targets = [a for a in args[args.index('install') + 1:]
             if not a.startswith('-')]
  assert len(targets) == 1, command
  target = targets[0]
  if ' @ ' in target:  # PEP 508 direct reference: name[extras] @ url.
    requirement = Requirement(target)
    assert requirement.name == 'mixer_jax'
    return set(requirement.extras)
  match = re.fullmatch(r'(.*?)(?:\[([\w,\s-]*)\])?', target)
  return {e.strip() for e in (match.group(2) or '').split(',') if e.strip()}


def _tensorflow_requirements(requirements, tf_providers):
  """Direct and transitive (installed) requirements naming a TensorFlow."""
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  from packaging.requirements import Requirement  # pylint: disable=g-import-not-at-top
  from packaging.utils import canonicalize_name  # pylint: disable=g-import-not-at-top
  found, seen = [], set()
  todo = [(r, 'mixer_jax') for r in requirements]
  while todo:
    requirement, parent = todo.pop()
    name = canonicalize_name(requirement.name)
    if name in tf_providers:
      found.append(f'{parent} -> {requirement}')
      continue
    key = (name, tuple(sorted(requirement.extras)))
    if key in seen:
      continue
    seen.add(key)
    try:
      requires = importlib.metadata.requires(requirement.name) or []
    except importlib.metadata.PackageNotFoundError:
      continue  # Not installed here: its own requirements are unknown.
    todo += [(r, requirement.name) for r in _requested(
        [Requirement(x) for x in requires], requirement.extras)]
  return found


@pytest.mark.parametrize('name', NAMES)
def test_install_cell_keeps_an_installed_tensorflow(name, tmp_path):
  """Colab has `tensorflow`: the cell must not ask for another TensorFlow.

  The cell runs in this environment, which has TensorFlow; its pip command
  is resolved against mixer_jax's requirements (from setup.py) and, through
  the installed packages' metadata, their requirements.
  """
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  from packaging.utils import canonicalize_name  # pylint: disable=g-import-not-at-top
  assert importlib.util.find_spec('tensorflow') is not None
  providers = TF_DISTRIBUTIONS | {
      canonicalize_name(d) for d in
      importlib.metadata.packages_distributions().get('tensorflow', [])}
  project = _project_requirements(tmp_path)
  [command] = _install_commands(name)
  extras = _project_extras(command)
  requested = _requested(project, extras)
  assert not _tensorflow_requirements(requested, providers), (
      f'{command} would install another TensorFlow beside the runtime\'s: '
      f'{_tensorflow_requirements(requested, providers)}')
  # Without a TensorFlow (a fresh machine), the same cell brings one.
  [command] = _install_commands(name, python_flags=('-S',))
  requested = _requested(project, _project_extras(command))
  assert _tensorflow_requirements(requested, providers), command
  # CI's `pip install -e '.[test]'` brings one too.
  assert _tensorflow_requirements(_requested(project, {'test'}), providers)


# ------------------------------------------------------- Offline execution.


def _execute(name, tmp_path, monkeypatch):
  """Runs notebook `name` with the offline parameters; returns the result."""
  # The kernel inherits this environment: XLA_FLAGS from conftest (8 CPU
  # devices), the working tree on the path, private checkpoint and data
  # directories.
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join(
      [str(REPO)] + [p for p in os.environ.get('PYTHONPATH', '').split(
          os.pathsep) if p]))
  monkeypatch.setenv('MIXER_JAX_CACHE', str(tmp_path / 'cache'))
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'tensorflow_datasets'))
  monkeypatch.setenv('MPLBACKEND', 'module://matplotlib_inline.backend_inline')
  # Compiling dominates a few steps of a tiny model; optimise less.
  monkeypatch.setenv('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
  output = tmp_path / f'executed_{name}'
  papermill.execute_notebook(
      str(NOTEBOOKS / name), str(output),
      parameters=_offline_parameters(name, tmp_path),
      kernel_name='python3', cwd=str(REPO), progress_bar=False,
      execution_timeout=600)
  return nbformat.read(output, as_version=4)


def _npz_size(path):
  with np.load(path, allow_pickle=False) as arrays:
    return sum(arrays[k].size for k in arrays.files)


def test_quickstart_runs_offline(tmp_path, monkeypatch):
  nb = _execute('quickstart.ipynb', tmp_path, monkeypatch)
  stdout = _stdout(nb)
  # The count printed is the number of values in the file it loaded.
  expected = _npz_size(tmp_path / 'random_mixer_s4.npz')
  assert f'{expected:,} parameters' in stdout
  # Top-5 labels of each of the three images, from the ImageNet class list.
  class_names = (REPO / 'mixer_jax' / 'data' /
                 'imagenet2012_classes.txt').read_text().splitlines()
  top5 = re.findall(r'^image (\d): (.*)$', stdout, flags=re.M)
  assert [i for i, _ in top5] == ['0', '1', '2']
  for _, labels in top5:
    names = [n.split(' (')[0] for n in labels.split(' | ')]
    assert len(names) == 5 and set(names) <= set(class_names), labels
  assert len(_images(nb)) == 1  # The figure with the pictures and labels.
  speed = re.search(r'([\d,]+) images/s', stdout)
  assert speed and int(speed.group(1).replace(',', '')) > 0
  # Stripping the executed notebook gives back the committed cells.
  committed = _read('quickstart.ipynb')
  stripped = strip_outputs(nb)
  assert stripped.cells == committed.cells


@pytest.mark.slow  # About a minute on a 2-core CPU, mostly compiling.
def test_finetune_runs_offline(tmp_path, monkeypatch):
  nb = _execute('finetune.ipynb', tmp_path, monkeypatch)
  workdir = tmp_path / 'workdir'
  with open(workdir / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f if line.strip()]
  steps = {r['step'] for r in records if 'train_loss' in r}
  assert steps == set(range(1, 7))
  assert {r['step'] for r in records if 'eval_accuracy' in r} == {3, 6}
  assert len(_images(nb)) == 1  # Loss and accuracy curves.
  # The notebook's own test evaluation of the weights restored from Orbax
  # agrees with the training loop's one test evaluation (last step).
  stdout = _stdout(nb)
  assert 'restored step 6' in stdout
  match = re.search(r'test accuracy ([\d.]+)% on (\d+) images \(training run '
                    r'at its last step: ([\d.]+)%\)', stdout)
  assert match, stdout
  assert match.group(1) == match.group(3)
  assert int(match.group(2)) == 359  # The whole digits test split.
  final_test = [r for r in records if 'test/accuracy' in r]
  assert [r['step'] for r in final_test] == [6]  # Scored once, at the end.
  assert float(match.group(1)) == pytest.approx(
      100 * final_test[0]['test/accuracy'], abs=0.005)
  # The exported file is an official-format checkpoint of the tiny model
  # with a 10-class digits head.
  with np.load(workdir / 'finetuned.npz', allow_pickle=False) as f:
    exported = dict(f)
  with np.load(tmp_path / 'random_mixer_s4.npz', allow_pickle=False) as f:
    initial = dict(f)
  assert exported['head/kernel'].shape == (TINY_MODEL['hidden_dim'], 10)
  assert initial['head/kernel'].shape == (TINY_MODEL['hidden_dim'], 1000)
  assert set(exported) == set(initial)  # 2 + 12 per block + 2 + 2 leaves.
  assert len(exported) == 2 + 12 * TINY_MODEL['num_blocks'] + 4
  # Training started from the checkpoint (not a fresh initialisation) and
  # moved every weight: a few small SGD steps keep them close to it.
  for key in exported:
    if key.startswith('head/') or not key.endswith('kernel'):
      continue
    before, after = initial[key].ravel(), exported[key].ravel()
    assert not np.array_equal(before, after), key
    assert np.corrcoef(before, after)[0, 1] > 0.9, key


if __name__ == '__main__':
  import sys  # pylint: disable=g-import-not-at-top
  for path in sys.argv[1:]:
    nbformat.write(with_repository(strip_outputs(
        nbformat.read(path, as_version=4)), repository_url()), path)
    print('stripped', path, 'and set its repository to', repository_url())
