"""Metrics output of a training run: TensorBoard, metrics.jsonl, stdout.

metrics.jsonl holds one JSON object per line ({"step": 100, "train_loss":
0.31, ...}); only process 0 writes files.
"""

import json
import os
from typing import Any, Mapping

from absl import logging
from clu import metric_writers
import jax
import numpy as np
import tensorflow as tf

METRICS_FILE = 'metrics.jsonl'


def _to_python(value):
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


class JsonLinesWriter(metric_writers.LoggingWriter):
  """Appends scalars and hparams to a JSON-lines file (other kinds: logged).
  """

  def __init__(self, path: str):
    super().__init__()
    self._file = tf.io.gfile.GFile(path, 'a')

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    record = {'step': int(step)}
    record.update({k: _to_python(v) for k, v in scalars.items()})
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()

  def write_hparams(self, hparams):
    record = {'hparams': {k: _to_python(v) for k, v in hparams.items()}}
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


def rewind(path: str, step: int) -> int:
  """Drops the records of steps after `step` and any torn line; the count.

  Those are a killed run's, written after the step it resumes from was
  saved: so each step is in the file once (at step 0 the hparams line goes
  too). Replaced through a temporary file, so a kill leaves old or new.
  """
  if not tf.io.gfile.exists(path):
    return 0
  lines = _read_lines(path)
  kept = []
  for line in lines:
    record = _parse(line) if line.endswith(b'\n') else None
    if record is None:
      continue  # Torn (cut by a kill), not UTF-8 or not JSON.
    if record.get('step', 0) > step or ('step' not in record and step == 0):
      continue
    kept.append(line)
  dropped = len(lines) - len(kept)
  if dropped:
    temporary = f'{path}.rewind.tmp'
    with tf.io.gfile.GFile(temporary, 'wb') as f:
      f.write(b''.join(kept))
    tf.io.gfile.rename(temporary, path, overwrite=True)
    logging.info('Dropped %d line(s) of %s after step %d (resumed run).',
                 dropped, path, step)
  return dropped


def create_writer(workdir: str,
                  start_step: int = 0) -> metric_writers.MetricWriter:
  """TensorBoard + JSON lines on process 0 (first `rewind` to `start_step`);
  logging only elsewhere."""
  if jax.process_index() > 0:
    return metric_writers.create_default_writer(workdir, just_logging=True)
  tf.io.gfile.makedirs(workdir)
  path = os.path.join(workdir, METRICS_FILE)
  rewind(path, start_step)
  return metric_writers.MultiWriter(
      [metric_writers.create_default_writer(workdir), JsonLinesWriter(path)])


def _read_lines(path: str) -> list:
  """The lines of `path` as bytes: a damaged line need not be UTF-8."""
  with tf.io.gfile.GFile(path, 'rb') as f:
    return f.read().splitlines(keepends=True)


def _parse(line: bytes):
  """The JSON object of one line, or None if it is not one."""
  try:
    record = json.loads(line.decode('utf-8'))
  except ValueError:  # Includes UnicodeDecodeError.
    return None
  return record if isinstance(record, dict) else None


def read_metrics(workdir: str):
  """The records of `metrics.jsonl` (hparams and unreadable lines skipped)."""
  lines = [line for line in _read_lines(os.path.join(workdir, METRICS_FILE))
           if line.strip()]
  records = [_parse(line) for line in lines]
  torn = sum(r is None for r in records)
  if torn:
    logging.warning('Skipped %d unreadable line(s) of %s (cut short by a '
                    'kill, or damaged).', torn,
                    os.path.join(workdir, METRICS_FILE))
  return [r for r in records if r is not None and 'step' in r]


def format_summary(summary: Mapping[str, Any]) -> str:
  """Multi-line, human-readable version of the final summary dict."""
  lines = ['Training summary:']
  width = max(len(k) for k in summary)
  for key, value in summary.items():
    if isinstance(value, float):
      value = f'{value:.4f}'
    lines.append(f'  {key.ljust(width)}  {value}')
  return '\n'.join(lines)


# Progress is printed to stdout (on process 0) as well as logged: library
# use (tests, notebooks) shows absl INFO logs nowhere, and the programs
# keep stdout for what the user reads (see command_line.py).
_print_progress = True


def set_print_progress(enabled: bool) -> None:
  """Whether `log_and_print` also prints to stdout (default True)."""
  global _print_progress
  _print_progress = enabled


def log_and_print(text: str) -> None:
  """Logs `text` and, on process 0, prints it unless turned off."""
  logging.info('%s', text)
  if _print_progress and jax.process_index() == 0:
    print(text, flush=True)
