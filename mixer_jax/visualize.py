"""Pictures of what a Mixer learned and how its runs went.

  python -m mixer_jax.visualize token_mixing --checkpoint=workdirs/quickstart
  python -m mixer_jax.visualize curves workdirs/quickstart --out=curves.png
  python -m mixer_jax.visualize compare workdirs/quickstart workdirs/other \
      --out=runs

token_mixing draws the paper's Figure 5 from any checkpoint
`any_checkpoint.load` accepts; curves plots a workdir's metrics.jsonl;
compare tables the runs' differing config fields and results (markdown on
stdout, OUT.md and OUT.csv with --out). Drawing needs matplotlib
(`pip install -e '.[plots]'`); compare does not.
"""

# Imports in functions: TensorFlow and JAX load when a mode needs them.
# pylint: disable=g-import-not-at-top,g-bad-import-order
# First, before TensorFlow loads: it quiets TensorFlow's C++ start-up lines.
from mixer_jax.training import command_line

import csv
import json
import math
import os
from typing import List, Optional, Sequence, Tuple

from absl import app
from absl import flags
import numpy as np

from mixer_jax.training import errors

USAGE = {'token_mixing': '--checkpoint and no workdir',
         'curves': 'one workdir and no --checkpoint',
         'compare': 'one or more workdirs and no --checkpoint'}
DPI = 100
PAD, TITLE = 16, 56  # Token-mixing figure: pixels around a panel, above.
CURVE_PANEL_INCHES = (7, 2)  # One curve panel (width, height); stacked.
# metrics.jsonl key and title of each curve panel, top to bottom.
CURVES = {'train_loss': 'train loss', 'train_learning_rate': 'learning rate',
          'accuracy': 'eval accuracy', 'images_per_sec': 'img/s',
          'input_wait_share': 'input-wait share'}


def pyplot():
  """matplotlib's pyplot on the Agg backend (files only, no display)."""
  try:
    import matplotlib
  except ImportError:
    raise errors.UsageError("Drawing needs matplotlib: pip install -e "
                            "'.[plots]' (or pip install matplotlib).") from None
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def spatial_frequency(units: np.ndarray, grid: Tuple[int, int]) -> np.ndarray:
  """Each column's energy-weighted mean radial frequency on `grid`, in
  cycles per grid side (0 for a constant unit)."""
  images = units.T.reshape((-1,) + tuple(grid))
  images = images - images.mean(axis=(1, 2), keepdims=True)
  power = np.abs(np.fft.fft2(images)) ** 2
  fy, fx = (np.fft.fftfreq(n) * n for n in grid)
  energy = power.sum(axis=(1, 2))
  weighted = (power * np.hypot(fy[:, None], fx[None, :])).sum(axis=(1, 2))
  return np.where(energy > 0, weighted / np.maximum(energy, 1e-30), 0.0)


def ordered_pairs(units: np.ndarray, grid: Tuple[int, int]):
  """[(unit, partner or None, mean frequency, correlation or None)] of the
  columns of `units` (patches, hidden), lowest frequency first; the two
  free units of most negative correlation (opposite phase) pair first."""
  with np.errstate(invalid='ignore', divide='ignore'):  # Constant units.
    corr = np.atleast_2d(np.nan_to_num(np.corrcoef(units, rowvar=False)))
  frequency = spatial_frequency(units, grid)
  free = corr.copy()
  np.fill_diagonal(free, np.inf)
  pairs, left = [], set(range(units.shape[1]))
  while len(left) > 1:
    i, j = sorted(map(int, np.unravel_index(np.argmin(free), free.shape)))
    pairs.append((i, j, float(frequency[i] + frequency[j]) / 2,
                  float(corr[i, j])))
    free[[i, j], :] = free[:, [i, j]] = np.inf
    left -= {i, j}
  pairs += [(i, None, float(frequency[i]), None) for i in left]
  return sorted(pairs, key=lambda p: (round(p[2], 9), p[0]))


def pair_sheet(units: np.ndarray, grid: Tuple[int, int], pairs) -> np.ndarray:
  """The pairs tiled on one image, NaN between, each unit in [-1, 1]."""
  rows, cols = grid
  scale = max(2, 48 // max(grid))
  inner, outer = max(1, scale // 3), max(6, scale)
  per_row = math.ceil(math.sqrt(len(pairs)))
  cell_h, cell_w = rows * scale, 2 * cols * scale + inner
  sheet = np.full((math.ceil(len(pairs) / per_row) * (cell_h + outer) - outer,
                   per_row * (cell_w + outer) - outer), np.nan, np.float32)
  for n, pair in enumerate(pairs):
    top, left = (n // per_row) * (cell_h + outer), (n % per_row) * (
        cell_w + outer)
    for side, unit in enumerate(u for u in pair[:2] if u is not None):
      image = units[:, unit].reshape(grid)
      x = left + side * (cols * scale + inner)
      sheet[top:top + cell_h, x:x + cols * scale] = np.kron(
          image / max(float(np.abs(image).max()), 1e-30),
          np.ones((scale, scale)))
  return sheet


def draw_token_mixing(loaded, out: str, num_blocks: int = 3) -> List[list]:
  """Writes one panel per block of a `Loaded` to `out`; returns the pairs."""
  from mixer_jax.weights import official_format
  plt = pyplot()
  side = loaded.image_size // loaded.model.patch_size
  grid, params = (side, side), official_format.unwrap(loaded.params)
  drawn, sheets = [], []
  for block in range(min(num_blocks, loaded.model.num_blocks)):
    units = np.asarray(params[f'MixerBlock_{block}']['token_mixing'][
        'Dense_0']['kernel'], np.float32)
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


def read_metrics(workdir: str) -> List[dict]:
  """The step records of `workdir/metrics.jsonl` (local or gs://)."""
  import tensorflow as tf
  from mixer_jax.training import reporting
  if not tf.io.gfile.exists(os.path.join(workdir, reporting.METRICS_FILE)):
    raise errors.UsageError(f'{workdir} has no {reporting.METRICS_FILE}: give '
                            'the --workdir of a mixer_jax.train run.')
  return reporting.read_metrics(workdir)


def series(records: Sequence[dict], key: str):
  held = [r for r in records if r.get(key) is not None]
  return [r['step'] for r in held], [r[key] for r in held]


def eval_accuracy_keys(records: Sequence[dict]) -> List[str]:
  """Every eval's accuracy key ('eval_accuracy', 'test/accuracy', ...)."""
  return sorted({k for r in records for k in r
                 if k.endswith('accuracy') and not k.startswith('train')})


def draw_curves(workdir: str, out: str) -> List[str]:
  """Writes a run's curves to `out` (PNG); returns the panels' titles."""
  records = read_metrics(workdir)
  accuracies = eval_accuracy_keys(records)
  panels = [(key, title) for key, title in CURVES.items()
            if (accuracies if key == 'accuracy' else series(records, key)[0])]
  if not panels:
    raise errors.UsageError(f'{workdir}/metrics.jsonl holds no step yet.')
  plt = pyplot()
  width, height = CURVE_PANEL_INCHES
  figure, axes = plt.subplots(len(panels), 1, sharex=True, squeeze=False,
                              dpi=DPI, figsize=(width, height * len(panels)))
  for (key, title), ax in zip(panels, axes[:, 0]):
    for name in accuracies if key == 'accuracy' else [key]:
      ax.plot(*series(records, name), marker='o' if name != key else None,
              markersize=3, label=name)
    if key == 'accuracy':
      ax.legend(fontsize=7)
    ax.set_yscale('log' if key == 'train_loss' else 'linear')
    ax.set_ylabel(title, fontsize=8)
    ax.grid(alpha=0.3)
  axes[-1, 0].set_xlabel('step')
  axes[0, 0].set_title(os.path.basename(os.path.normpath(workdir)))
  figure.tight_layout()
  figure.savefig(out, dpi=DPI)
  plt.close(figure)
  return [title for _, title in panels]


def wall_time(workdir: str) -> Optional[float]:
  """The TensorBoard records' span, summed over the event files (one per
  start of the run); None without them."""
  import tensorflow as tf
  spans = []
  for path in tf.io.gfile.glob(os.path.join(workdir, 'events.out.tfevents.*')):
    times = [e.wall_time for e in tf.compat.v1.train.summary_iterator(path)]
    spans += [max(times) - min(times)] if times else []
  return sum(spans) if spans else None


def run_results(workdir: str) -> dict:
  """A run's results as its metrics.jsonl holds them (None where absent)."""
  records = read_metrics(workdir)
  values = {k: series(records, k)[1]
            for k in eval_accuracy_keys(records) + ['images_per_sec', 'mfu']}
  mean = lambda key: float(np.mean(values[key])) if values[key] else None
  return {'best eval': max(values.pop('eval_accuracy', []), default=None),
          **{k: v[-1] for k, v in values.items() if 'accuracy' in k and v},
          'steps': max((r['step'] for r in records), default=None),
          'wall time (s)': wall_time(workdir),
          'img/s': mean('images_per_sec'), 'MFU': mean('mfu')}


def compare_runs(workdirs: Sequence[str]) -> Tuple[List[str], List[list]]:
  """(header, rows): workdir, the config fields that differ, the results."""
  from flax import traverse_util
  from mixer_jax.weights import run_info
  configs = [{k: json.dumps(v) if isinstance(v, (list, tuple)) else v
              for k, v in traverse_util.flatten_dict(run_info.read_run_info(
                  w)['config'].to_dict(), sep='.').items()} for w in workdirs]
  results = [run_results(w) for w in workdirs]
  fields = sorted({k for c in configs for k in c
                   if len({json.dumps(d.get(k)) for d in configs}) > 1})
  names = [k for k in dict.fromkeys(k for r in results for k in r)
           if any(r.get(k) is not None for r in results)]
  rows = [[w] + [c.get(k) for k in fields] + [r.get(k) for k in names]
          for w, c, r in zip(workdirs, configs, results)]
  return ['workdir'] + fields + names, rows


def markdown_table(header: Sequence[str], rows: Sequence[list]) -> str:
  """A GitHub markdown table; floats to 4 significant digits."""
  cell = lambda v: ('' if v is None else f'{v:.4g}' if isinstance(v, float)
                    else str(v).replace('|', '\\|'))
  lines = [header, ['---'] * len(header)] + [list(map(cell, r)) for r in rows]
  return '\n'.join('| ' + ' | '.join(map(str, line)) + ' |' for line in lines)


FLAGS = flags.FLAGS


def _define_flags():
  # Only when run as a program: importers keep their own flags.
  flags.DEFINE_string('checkpoint', None, 'token_mixing: training workdir, '
                      'registry name, hf-hub:OWNER/NAME, .npz, .safetensors '
                      'or exported folder.')
  flags.DEFINE_integer('step', None, 'token_mixing: Orbax step of a workdir '
                       '(default: the newest).')
  flags.DEFINE_integer('blocks', 3, 'token_mixing: the first blocks drawn.',
                       lower_bound=1)
  flags.DEFINE_string('out', None, 'The PNG written (default: MODE.png); '
                      'compare: writes OUT.md and OUT.csv.')
  command_line.define_verbose_flag()


def main(argv):
  command_line.set_up_output(FLAGS.verbose)
  command_line.load_tensorflow_quietly()
  with command_line.user_errors_as_one_line():
    mode, args = (argv[1], argv[2:]) if len(argv) > 1 else (None, [])
    if mode not in USAGE:
      raise errors.UsageError(f'Give one of {", ".join(USAGE)} first (got '
                              f'{mode!r}).')
    counts = {'token_mixing': not args, 'curves': len(args) == 1}
    if ((mode == 'token_mixing') != (FLAGS.checkpoint is not None) or
        not counts.get(mode, bool(args))):
      raise errors.UsageError(f'{mode} takes {USAGE[mode]}.')
    out = FLAGS.out or (f'{mode}.png' if mode != 'compare' else None)
    if out and os.path.dirname(out):
      os.makedirs(os.path.dirname(out), exist_ok=True)
    if mode == 'token_mixing':
      from mixer_jax.weights import any_checkpoint
      drawn = draw_token_mixing(any_checkpoint.load(
          FLAGS.checkpoint, step=FLAGS.step), out, FLAGS.blocks)
      # Greedy pairs of random units on a 4x4 grid: about -0.5; the paper's
      # partners are near -1.
      median = [np.median([p[3] for p in pairs if p[1] is not None])
                for pairs in drawn]
      print(f'Wrote {out}: {sum(map(len, drawn))} pairs in {len(drawn)} '
            'block(s); median correlation of the partners by block: '
            f'{", ".join(f"{m:.2f}" for m in median)}.')
    elif mode == 'curves':
      print(f'Wrote {out}: {", ".join(draw_curves(args[0], out))}.')
    else:
      header, rows = compare_runs(args)
      table = markdown_table(header, rows)
      print(table)
      if out:
        with open(out + '.md', 'w', encoding='utf-8') as f:
          f.write(table + '\n')
        with open(out + '.csv', 'w', newline='', encoding='utf-8') as f:
          csv.writer(f).writerows([header] + rows)
  return 0


if __name__ == '__main__':
  _define_flags()
  app.run(main)
