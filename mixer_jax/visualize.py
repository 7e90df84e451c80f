"""Pictures of what a Mixer learned and how its runs went.

  python -m mixer_jax.visualize token_mixing --checkpoint=workdirs/quickstart --out=token_mixing.png
  python -m mixer_jax.visualize curves workdirs/quickstart --out=curves.png
  python -m mixer_jax.visualize compare workdirs/quickstart workdirs/other --out=runs

- token_mixing: the paper's Figure 5 for any checkpoint
  `any_checkpoint.load` accepts (workdir, `.npz`, registry or Hub name,
  exported folder). Each hidden unit of the first `--blocks` token-mixing
  MLPs (a column of `MixerBlock_i/token_mixing/Dense_0/kernel`, one weight
  per patch) is drawn on the patch grid, next to its opposite-phase partner
  (the unit it is most negatively correlated with), pairs ordered by
  spatial frequency; one panel per block, red positive, blue negative.
- curves: a workdir's `metrics.jsonl` against the step: train loss,
  learning rate, every eval's accuracy, img/s and input-wait share.
- compare: one row per workdir, the config fields that differ between them
  and the results (best eval, test accuracy, steps, wall time, img/s, MFU);
  printed as markdown, and written to `OUT.md` and `OUT.csv` with `--out`.

Drawing needs matplotlib (`pip install -e '.[plots]'`); `compare` does not.
"""

# First, before TensorFlow loads: it quiets TensorFlow's C++ start-up lines.
from mixer_jax.training import command_line  # pylint: disable=g-bad-import-order

import csv
import glob
import json
import math
import os
import sys
from typing import List, Optional, Sequence, Tuple

from absl import app
from absl import flags
import numpy as np

from mixer_jax.training import errors

# What each mode takes after the flags.
USAGE = {'token_mixing': '--checkpoint and no workdir',
         'curves': 'one workdir and no --checkpoint',
         'compare': 'one or more workdirs and no --checkpoint'}
MODES = tuple(USAGE)
DPI = 100
PAD, TITLE = 16, 56  # Token-mixing figure: pixels around a panel, above.
CURVE_PANEL_INCHES = (7.0, 2.0)  # One curve panel; panels stacked.
# metrics.jsonl key and panel title of each curve panel, in drawing order.
CURVES = (('train_loss', 'train loss'), ('train_learning_rate',
                                         'learning rate'),
          ('accuracy', 'eval accuracy'), ('images_per_sec', 'img/s'),
          ('input_wait_share', 'input-wait share'))


def pyplot():
  """matplotlib's pyplot on the Agg backend (files only, no display)."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise errors.UsageError(
        "Drawing needs matplotlib: pip install -e '.[plots]' (or pip "
        'install matplotlib).') from None
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


# ------------------------------------------------- Token-mixing units.


def opposite_phase_pairs(units: np.ndarray) -> List[Tuple[int, Optional[int]]]:
  """Pairs the columns of `units` (patches, hidden), most opposite first.

  Greedy on the Pearson correlation of the columns: the two free units with
  the most negative correlation form a pair, until one or none is left (an
  odd one out is paired with None). Each pair is (lower index, higher).
  """
  with np.errstate(invalid='ignore', divide='ignore'):  # Constant units.
    corr = np.nan_to_num(np.corrcoef(units, rowvar=False), nan=0.0)
  corr = np.atleast_2d(corr)
  np.fill_diagonal(corr, np.inf)
  free, pairs = set(range(units.shape[1])), []
  while len(free) > 1:
    i, j = np.unravel_index(np.argmin(corr), corr.shape)
    pairs.append((int(min(i, j)), int(max(i, j))))
    corr[[i, j], :] = corr[:, [i, j]] = np.inf
    free -= {int(i), int(j)}
  return pairs + [(free.pop(), None)] if free else pairs


def spatial_frequency(units: np.ndarray, grid: Tuple[int, int]) -> np.ndarray:
  """Each unit's energy-weighted mean radial frequency on the patch grid.

  Args:
    units: (patches, hidden), patches in row-major grid order.
    grid: (rows, columns) of patches.

  Returns:
    (hidden,) frequencies in cycles per grid side (a cosine with k cycles
    along one side gives k); 0 for a constant unit.
  """
  images = units.T.reshape((-1,) + tuple(grid))
  images = images - images.mean(axis=(1, 2), keepdims=True)
  power = np.abs(np.fft.fft2(images)) ** 2
  fy, fx = (np.fft.fftfreq(n) * n for n in grid)
  radius = np.hypot(fy[:, None], fx[None, :])
  energy = power.sum(axis=(1, 2))
  return np.where(energy > 0, (power * radius).sum(axis=(1, 2)) /
                  np.maximum(energy, 1e-30), 0.0)


def ordered_pairs(units: np.ndarray, grid: Tuple[int, int]):
  """`opposite_phase_pairs` sorted by the pair's mean spatial frequency.

  Returns:
    [(unit, partner or None, frequency)], lowest frequency first.
  """
  frequency = spatial_frequency(units, grid)
  pairs = [(i, j, float(np.mean(frequency[[k for k in (i, j)
                                            if k is not None]])))
           for i, j in opposite_phase_pairs(units)]
  return sorted(pairs, key=lambda p: (round(p[2], 9), p[0]))


def token_mixing_units(params, block: int) -> np.ndarray:
  """The first token-mixing kernel of `block`: (patches, hidden)."""
  from mixer_jax.weights import official_format  # pylint: disable=g-import-not-at-top
  blocks = official_format.unwrap(params)
  name = f'MixerBlock_{block}'
  if name not in blocks:
    raise errors.UsageError(f'The checkpoint has no {name} (blocks 0 to '
                            f'{sum(k.startswith("MixerBlock_") for k in blocks) - 1}).')
  return np.asarray(blocks[name]['token_mixing']['Dense_0']['kernel'],
                    np.float32)


def pair_sheet(units: np.ndarray, grid: Tuple[int, int], pairs) -> np.ndarray:
  """The pairs tiled on one image: NaN between units, each unit in [-1, 1].

  `scale` pixels per patch (a unit about 48 pixels wide); a pair's units
  side by side, `scale // 3` pixels apart; pairs in reading order on a
  square grid of pairs, at least 6 pixels apart.
  """
  rows, cols = grid
  scale = max(2, 48 // max(grid))
  inner, outer = max(1, scale // 3), max(6, scale)
  per_row = math.ceil(math.sqrt(len(pairs)))
  cell_h, cell_w = rows * scale, 2 * cols * scale + inner
  sheet = np.full((math.ceil(len(pairs) / per_row) * (cell_h + outer) - outer,
                   per_row * (cell_w + outer) - outer), np.nan, np.float32)
  for n, pair in enumerate(pairs):
    top = (n // per_row) * (cell_h + outer)
    left = (n % per_row) * (cell_w + outer)
    for side, unit in enumerate(pair[:2]):
      if unit is None:
        continue
      image = units[:, unit].reshape(grid)
      image = image / max(float(np.abs(image).max()), 1e-30)
      x = left + side * (cols * scale + inner)
      sheet[top:top + cell_h, x:x + cols * scale] = np.kron(
          image, np.ones((scale, scale)))
  return sheet


def draw_token_mixing(loaded, out: str, num_blocks: int = 3) -> List[list]:
  """Writes the token-mixing figure of a `Loaded` to `out` (PNG).

  One panel per block, side by side, one screen pixel per sheet pixel
  (`pair_sheet`): the PNG is `num_blocks * (width + 2 * PAD)` pixels wide.

  Returns:
    The ordered pairs of each block drawn (see `ordered_pairs`).
  """
  plt = pyplot()
  side = loaded.image_size // loaded.model.patch_size
  grid = (side, side)
  drawn, sheets = [], []
  for block in range(min(num_blocks, loaded.model.num_blocks)):
    units = token_mixing_units(loaded.params, block)
    if units.shape[0] != side * side:
      raise errors.UsageError(
          f'Block {block} mixes {units.shape[0]} tokens, not the '
          f'{side}x{side} patches of a {loaded.image_size} image.')
    drawn.append(ordered_pairs(units, grid))
    sheets.append(pair_sheet(units, grid, drawn[-1]))
  height, width = sheets[0].shape
  fig_w, fig_h = len(sheets) * (width + 2 * PAD), height + TITLE + PAD
  figure = plt.figure(figsize=(fig_w / DPI, fig_h / DPI), dpi=DPI)
  colours = plt.get_cmap('RdBu_r').with_extremes(bad='white')
  for block, sheet in enumerate(sheets):
    ax = figure.add_axes(((block * (width + 2 * PAD) + PAD) / fig_w,
                          PAD / fig_h, width / fig_w, height / fig_h))
    ax.imshow(sheet, cmap=colours, vmin=-1, vmax=1, interpolation='nearest')
    ax.set_title(f'block {block}: {len(drawn[block])} pairs', fontsize=9)
    ax.axis('off')
  figure.suptitle(f'{loaded.portable_source}: token-mixing units on the '
                  f'{side}x{side} patch grid, opposite-phase pairs by '
                  'spatial frequency', fontsize=8, wrap=True)
  figure.savefig(out, dpi=DPI)
  plt.close(figure)
  return drawn


# ------------------------------------------------------------- Runs.


def read_metrics(workdir: str) -> List[dict]:
  """The step records of `workdir/metrics.jsonl`; a clear error if none."""
  from mixer_jax.training import reporting  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(os.path.join(workdir, reporting.METRICS_FILE)):
    raise errors.UsageError(
        f'{workdir} has no {reporting.METRICS_FILE}: give the --workdir of '
        'a mixer_jax.train run.')
  return reporting.read_metrics(workdir)


def series(records: Sequence[dict], key: str):
  """(steps, values) of the records holding `key`."""
  points = [(r['step'], r[key]) for r in records if r.get(key) is not None]
  return [s for s, _ in points], [v for _, v in points]


def eval_accuracy_keys(records: Sequence[dict]) -> List[str]:
  """Every eval's accuracy key ('eval_accuracy', 'test/accuracy', ...)."""
  keys = {k for r in records for k in r if k.endswith('accuracy')}
  return sorted(k for k in keys if not k.startswith('train'))


def draw_curves(workdir: str, out: str) -> List[str]:
  """Writes a run's curves to `out` (PNG), one panel per quantity logged.

  Returns:
    The panel titles, top to bottom.
  """
  records = read_metrics(workdir)
  panels = [(key, title) for key, title in CURVES
            if (eval_accuracy_keys(records) if key == 'accuracy'
                else series(records, key)[0])]
  if not panels:
    raise errors.UsageError(f'{workdir}/metrics.jsonl holds no step yet.')
  plt = pyplot()
  width, height = CURVE_PANEL_INCHES
  figure, axes = plt.subplots(len(panels), 1, sharex=True, squeeze=False,
                              dpi=DPI, figsize=(width, height * len(panels)))
  for (key, title), ax in zip(panels, axes[:, 0]):
    for name in (eval_accuracy_keys(records) if key == 'accuracy' else [key]):
      steps, values = series(records, name)
      ax.plot(steps, values, marker='o' if key == 'accuracy' else None,
              markersize=3, label=name)
    if key == 'accuracy':
      ax.legend(fontsize=7)
    if key == 'train_loss':
      ax.set_yscale('log')
    ax.set_ylabel(title, fontsize=8)
    ax.grid(alpha=0.3)
  axes[-1, 0].set_xlabel('step')
  axes[0, 0].set_title(os.path.basename(os.path.normpath(workdir)))
  figure.tight_layout()
  figure.savefig(out, dpi=DPI)
  plt.close(figure)
  return [title for _, title in panels]


def wall_time(workdir: str) -> Optional[float]:
  """Seconds from the first to the last TensorBoard record, summed over the
  event files (one per start of the run); None without them."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  total = None
  for path in glob.glob(os.path.join(workdir, 'events.out.tfevents.*')):
    times = [tf.compat.v1.Event.FromString(record.numpy()).wall_time
             for record in tf.data.TFRecordDataset(path)]
    if times:
      total = (total or 0.0) + max(times) - min(times)
  return total


def run_results(workdir: str) -> dict:
  """A run's results as metrics.jsonl holds them (None where absent)."""
  records = read_metrics(workdir)
  _, evals = series(records, 'eval_accuracy')
  _, tests = series(records, 'test/accuracy')
  mean = lambda key: (float(np.mean(series(records, key)[1]))
                      if series(records, key)[1] else None)
  return {'best eval': max(evals) if evals else None,
          'test': tests[-1] if tests else None,
          'steps': max((r['step'] for r in records), default=None),
          'wall time (s)': wall_time(workdir),
          'img/s': mean('images_per_sec'), 'MFU': mean('mfu')}


def compare_runs(workdirs: Sequence[str]) -> Tuple[List[str], List[list]]:
  """(header, rows): workdir, the config fields that differ, the results."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from mixer_jax.weights import run_info  # pylint: disable=g-import-not-at-top
  configs, results = [], []
  for workdir in workdirs:
    results.append(run_results(workdir))
    config = run_info.read_run_info(workdir)['config'].to_dict()
    configs.append({k: json.dumps(v) if isinstance(v, (list, tuple)) else v
                    for k, v in traverse_util.flatten_dict(
                        config, sep='.').items()})
  fields = sorted({k for c in configs for k in c
                   if len({json.dumps(d.get(k)) for d in configs}) > 1})
  names = [k for k in results[0] if any(r[k] is not None for r in results)]
  rows = [[w] + [c.get(k) for k in fields] + [r[k] for k in names]
          for w, c, r in zip(workdirs, configs, results)]
  return ['workdir'] + fields + names, rows


def markdown_table(header: Sequence[str], rows: Sequence[list]) -> str:
  """A GitHub markdown table; floats to 4 significant digits."""
  cell = lambda v: ('' if v is None else f'{v:.4g}' if isinstance(v, float)
                    else str(v).replace('|', '\\|'))
  lines = [header, ['---'] * len(header)] + [[cell(v) for v in r]
                                             for r in rows]
  return '\n'.join('| ' + ' | '.join(map(str, line)) + ' |' for line in lines)


# ------------------------------------------------------------ Program.

FLAGS = flags.FLAGS


def _define_flags():
  """Defines the command-line flags (only when run as a program)."""
  flags.DEFINE_string('checkpoint', None, 'token_mixing: training workdir, '
                      'registry name, hf-hub:OWNER/NAME, .npz, .safetensors '
                      'or exported folder.')
  flags.DEFINE_integer('step', None, 'token_mixing: Orbax step of a workdir '
                       '(default: the newest).')
  flags.DEFINE_integer('blocks', 3, 'token_mixing: the first blocks drawn.',
                       lower_bound=1)
  flags.DEFINE_string('out', None, 'The PNG written (token_mixing: '
                      'token_mixing.png, curves: curves.png); compare: '
                      'OUT.md and OUT.csv (default: printed only).')
  command_line.define_verbose_flag()


def main(argv):
  command_line.set_up_output(FLAGS.verbose)
  command_line.load_tensorflow_quietly()
  with command_line.user_errors_as_one_line():
    mode, args = (argv[1], argv[2:]) if len(argv) > 1 else (None, [])
    if mode not in MODES:
      raise errors.UsageError(f'Give one of {", ".join(MODES)} first '
                              f'(got {mode!r}).')
    counts = {'token_mixing': [0], 'curves': [1]}.get(mode)
    if ((mode == 'token_mixing') != (FLAGS.checkpoint is not None) or
        (len(args) not in counts if counts else not args)):
      raise errors.UsageError(f'{mode} takes {USAGE[mode]}.')
    out = FLAGS.out or (f'{mode}.png' if mode != 'compare' else None)
    if out and os.path.dirname(out):
      os.makedirs(os.path.dirname(out), exist_ok=True)
    if mode == 'token_mixing':
      from mixer_jax.weights import any_checkpoint  # pylint: disable=g-import-not-at-top
      loaded = any_checkpoint.load(FLAGS.checkpoint, step=FLAGS.step)
      drawn = draw_token_mixing(loaded, out, FLAGS.blocks)
      print(f'Wrote {out}: {len(drawn)} block(s), '
            f'{sum(map(len, drawn))} pairs.')
    elif mode == 'curves':
      panels = draw_curves(args[0], out)
      print(f'Wrote {out}: {", ".join(panels)}.')
    else:
      header, rows = compare_runs(args)
      table = markdown_table(header, rows)
      print(table)
      if out:
        with open(out + '.md', 'w', encoding='utf-8') as f:
          f.write(table + '\n')
        with open(out + '.csv', 'w', newline='', encoding='utf-8') as f:
          csv.writer(f).writerows([header] + rows)
        print(f'Wrote {out}.md and {out}.csv.', file=sys.stderr)
  return 0


if __name__ == '__main__':
  _define_flags()
  app.run(main)
