"""mixer_jax.visualize: known pairs and frequencies, PNG panels, run tables."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from configs import quickstart
from mixer_jax import visualize
from mixer_jax.training import errors
from mixer_jax.training import trainer
from mixer_jax.weights import any_checkpoint

import mixer_reference as ref

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID = (8, 8)
# Grating wave numbers (rows, columns) of distinct radial frequency, below
# the grid's Nyquist frequency: each gives a unit and its negative.
WAVES = ((2, 2), (0, 1), (3, 1), (1, 1), (0, 3), (2, 1), (0, 2), (3, 2))
LONE_WAVE = (3, 3)  # One unit without a negative: paired with None.


def gratings(seed=0):
  """(units (64, 17), the true pairs {frozenset}, frequency of each pair).

  Each pair is a cosine grating of random phase and amplitude and its
  negative (another amplitude), columns shuffled.
  """
  rng = np.random.RandomState(seed)
  y, x = np.meshgrid(*(np.arange(n) for n in GRID), indexing='ij')
  columns = []
  for ky, kx in WAVES + (LONE_WAVE,):
    wave = np.cos(2 * np.pi * (ky * y / GRID[0] + kx * x / GRID[1]) +
                  rng.uniform(0, 2 * np.pi)).ravel()
    columns.append(wave * rng.uniform(0.5, 2))
    if (ky, kx) != LONE_WAVE:
      columns.append(-wave * rng.uniform(0.5, 2))
  order = rng.permutation(len(columns))
  units = np.stack(columns, axis=1)[:, order].astype(np.float32)
  where = np.argsort(order)  # Column of each constructed unit.
  pairs = {frozenset((int(where[2 * n]), int(where[2 * n + 1])))
           for n in range(len(WAVES))}
  pairs.add(frozenset((int(where[-1]), None)))
  return units, pairs


def expected_order():
  """The true frequency of each drawn pair, lowest first."""
  return sorted(np.hypot(*w) for w in WAVES + (LONE_WAVE,))


def test_pairs_and_frequency_order_are_recovered():
  units, pairs = gratings()
  drawn = visualize.ordered_pairs(units, GRID)
  assert {frozenset((i, j)) for i, j, *_ in drawn} == pairs
  np.testing.assert_allclose([p[2] for p in drawn], expected_order(),
                             rtol=1e-5)
  assert drawn[-1][1:4:2] == (None, None)  # LONE_WAVE: highest frequency.
  np.testing.assert_allclose([p[3] for p in drawn[:-1]], -1, rtol=1e-5)


def test_sheet_holds_every_unit_once():
  units, _ = gratings()
  pairs = visualize.ordered_pairs(units, GRID)
  sheet = visualize.pair_sheet(units, GRID, pairs)
  scale = 48 // 8
  assert np.isfinite(sheet).sum() == units.shape[1] * (8 * scale) ** 2
  assert np.nanmax(np.abs(sheet)) == pytest.approx(1.0)


WALL_TIMES = []  # The runs' own wall time (start-up included).


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Two short quick-start runs that differ in learning rate and steps."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  workdirs = []
  for steps, learning_rate in ((20, 2e-3), (10, 1e-3)):
    config = quickstart.get_config()
    config.data_dir = data_dir
    config.model.num_blocks, config.model.hidden_dim = 2, 32
    config.model.tokens_mlp_dim, config.model.channels_mlp_dim = 16, 64
    config.num_train_steps, config.warmup_steps = steps, 2
    config.learning_rate = learning_rate
    config.log_every_steps, config.eval_every_steps = 2, 5
    config.checkpoint_every_steps = 10
    workdir = str(tmp_path_factory.mktemp(f'run{steps}'))
    summary = trainer.train_and_evaluate(config, workdir)
    workdirs.append(workdir)
    WALL_TIMES.append(summary['wall_time_s'])
  return workdirs


def test_figure_of_an_official_file_has_the_constructed_pairs(tmp_path):
  """Block 0 of an .npz holds the gratings: the figure pairs them."""
  flat = ref.official_checkpoint(0, patch=2, image=16, tokens_mlp=17)
  units, pairs = gratings()
  flat['MixerBlock_0/token_mixing/Dense_0/kernel'] = units
  np.savez(tmp_path / 'gratings.npz', **flat)
  loaded = any_checkpoint.load(str(tmp_path / 'gratings.npz'))
  out = tmp_path / 'figure.png'
  drawn = visualize.draw_token_mixing(loaded, str(out), num_blocks=5)
  assert len(drawn) == 2  # The file has two blocks.
  assert {frozenset((i, j)) for i, j, *_ in drawn[0]} == pairs
  np.testing.assert_allclose([p[2] for p in drawn[0]], expected_order(),
                             rtol=1e-5)
  height, width = visualize.pair_sheet(units, GRID, drawn[0]).shape
  with Image.open(out) as image:  # Two panels side by side.
    assert image.size == (2 * (width + 2 * visualize.PAD),
                          height + visualize.TITLE + visualize.PAD)


def test_figure_of_a_workdir(runs, tmp_path):
  out = tmp_path / 'figure.png'
  drawn = visualize.draw_token_mixing(any_checkpoint.load(runs[0]), str(out),
                                      num_blocks=1)
  assert len(drawn) == 1 and len(drawn[0]) == 8  # 16 units, 8 pairs.
  assert sorted(u for p in drawn[0] for u in p[:2]) == list(range(16))
  with Image.open(out) as image:
    assert image.size[0] > image.size[1] > visualize.TITLE


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [r for r in map(json.loads, f) if 'step' in r]


def test_curves_have_one_panel_per_quantity(runs, tmp_path):
  out = tmp_path / 'curves.png'
  panels = visualize.draw_curves(runs[0], str(out))
  assert panels == ['train loss', 'learning rate', 'eval accuracy', 'img/s',
                    'input-wait share']
  assert visualize.eval_accuracy_keys(_records(runs[0])) == [
      'eval_accuracy', 'test/accuracy']
  width, height = visualize.CURVE_PANEL_INCHES
  with Image.open(out) as image:
    assert image.size == (width * visualize.DPI,
                          len(panels) * height * visualize.DPI)


def test_table_holds_what_metrics_jsonl_holds(runs):
  header, rows = visualize.compare_runs(runs)
  assert header == ['workdir', 'learning_rate', 'num_train_steps',
                    'best eval', 'test/accuracy', 'steps', 'wall time (s)',
                    'img/s']
  for workdir, row, wall_time in zip(runs, rows, WALL_TIMES):
    records = _records(workdir)
    values = dict(zip(header, row))
    assert values['best eval'] == max(r['eval_accuracy'] for r in records
                                      if 'eval_accuracy' in r)
    assert values['test/accuracy'] == [r['test/accuracy'] for r in records
                              if 'test/accuracy' in r][-1]
    assert values['steps'] == values['num_train_steps'] == max(
        r['step'] for r in records)
    assert values['img/s'] == np.mean([r['images_per_sec'] for r in records
                                       if 'images_per_sec' in r])
    # The event files span the training loop: less than the whole run.
    assert 0 < values['wall time (s)'] < wall_time
  assert [r[1] for r in rows] == [2e-3, 1e-3]
  table = visualize.markdown_table(header, rows).splitlines()
  assert len(table) == 4 and table[1] == '|' + ' --- |' * len(header)
  assert f'| {rows[1][3]:.4g} |' in table[3]


def test_missing_matplotlib_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, 'matplotlib', None)
  with pytest.raises(errors.UsageError, match=r"pip install -e '\.\[plots\]'"):
    visualize.pyplot()


def _run(*args, cwd=REPO):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run([sys.executable, '-m', 'mixer_jax.visualize', *args],
                        cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=300)


@pytest.mark.slow
def test_commands(runs, tmp_path):
  proc = _run('token_mixing', f'--checkpoint={runs[0]}', '--out=tm.png',
              cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith('Wrote tm.png: 16 pairs in 2 block(s); '
                                'median correlation of the partners')
  proc = _run('curves', runs[1], cwd=tmp_path)
  assert proc.returncode == 0 and os.path.exists(tmp_path / 'curves.png')
  proc = _run('compare', *runs, '--out=runs', cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  with open(tmp_path / 'runs.md', encoding='utf-8') as f:
    assert proc.stdout == f.read()
  with open(tmp_path / 'runs.csv', encoding='utf-8') as f:
    table = list(csv.reader(f))
  assert table[0] == visualize.compare_runs(runs)[0] and len(table) == 3
  # User errors: one line, no traceback.
  for args, message in (
      (('draw',), "Give one of token_mixing, curves, compare first (got "
                  "'draw')."),
      (('curves', str(tmp_path)), f'{tmp_path} has no metrics.jsonl'),
      (('compare',), 'compare takes one or more workdirs')):
    proc = _run(*args, cwd=tmp_path)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
