"""Metrics output of a training run: TensorBoard, JSON lines, progress line.

`create_writer` returns one clu `MetricWriter` that sends scalars both to
TensorBoard event files and to `metrics.jsonl` in the workdir (one JSON
object per line: {"step": 100, "train_loss": 0.31, ...}), which is easy to
read back with pandas or a few lines of Python. Only process 0 writes files;
other processes just log.
"""

import json
import math
import os
import time
from typing import Any, Mapping, Optional

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

  The file is opened in append mode so a resumed run continues the same
  file (after `rewind`).
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
    record = {'hparams': {k: _to_python(v) if v is not None else None
                          for k, v in hparams.items()}}
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


def rewind(path: str, step: int) -> int:
  """Drops the records of steps after `step` and any torn line of `path`.

  A run resumed at step K calls it first: the records of later steps
  (written after step K was saved, by the run that was killed) go, as does a
  line cut short by the kill, so every step has one record of each kind in
  the file. At step 0 the hparams line goes too (the run writes it again).
  The file is rewritten to a temporary file that then replaces it, so a kill
  at any moment leaves either the old or the new file. Nothing is written
  when nothing is dropped.

  Returns:
    The number of lines dropped.
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
  """The lines of `path` as bytes (each with its newline, if it has one).

  Bytes, not text: a damaged file may hold bytes that are not UTF-8, and
  those lines are skipped like any other unreadable line.
  """
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
  """Reads `metrics.jsonl` back as a list of dicts (hparams lines skipped).

  A line that is not a UTF-8 JSON object (the last line of a run killed
  while writing it, a damaged byte) is skipped with a warning.
  """
  lines = [line for line in _read_lines(os.path.join(workdir, METRICS_FILE))
           if line.strip()]
  records = [_parse(line) for line in lines]
  torn = sum(r is None for r in records)
  if torn:
    logging.warning('Skipped %d unreadable line(s) of %s (cut short by a '
                    'kill, or damaged).', torn,
                    os.path.join(workdir, METRICS_FILE))
  return [r for r in records if r is not None and 'step' in r]


def _format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f'{hours}h{minutes:02d}m'
  return f'{minutes}m{secs:02d}s' if minutes else f'{secs}s'


class Progress:
  """Measures training speed between log points and formats a status line.

  Time spent in evaluation and checkpointing is excluded via `pause()` /
  `resume()`, so steps/s reflects training alone while the ETA uses it.
  """

  def __init__(self, start_step: int, num_train_steps: int, batch_size: int):
    self.num_train_steps = num_train_steps
    self.batch_size = batch_size
    self._last_step = start_step
    self._last_time = time.perf_counter()
    self._paused = 0.0
    self._pause_start: Optional[float] = None

  def restart(self, step: int) -> float:
    """Restarts the clock at `step`; returns seconds since the last start."""
    now = time.perf_counter()
    elapsed = now - self._last_time
    self._last_step, self._last_time, self._paused = step, now, 0.0
    return elapsed

  def pause(self):
    self._pause_start = time.perf_counter()

  def resume(self):
    if self._pause_start is not None:
      self._paused += time.perf_counter() - self._pause_start
      self._pause_start = None

  def measure(self, step: int, input_wait: Optional[float] = None) -> dict:
    """Returns steps/s and images/s since the previous call.

    With `input_wait` (seconds the loop waited for input batches in that
    time), also `input_wait_share`: its share of the training time.
    """
    now = time.perf_counter()
    elapsed = max(now - self._last_time - self._paused, 1e-9)
    steps = step - self._last_step
    self._last_step, self._last_time, self._paused = step, now, 0.0
    steps_per_sec = steps / elapsed
    speed = {'steps_per_sec': steps_per_sec,
             'images_per_sec': steps_per_sec * self.batch_size}
    if input_wait is not None:
      speed['input_wait_share'] = min(input_wait / elapsed, 1.0)
    return speed

  def line(self, step: int, speed: Mapping[str, float],
           metrics: Mapping[str, float]) -> str:
    remaining = self.num_train_steps - step
    eta = (remaining / speed['steps_per_sec'] if speed['steps_per_sec'] > 0
           else float('inf'))
    parts = [f'step {step}/{self.num_train_steps} '
             f'({100.0 * step / self.num_train_steps:.1f}%)']
    parts += [f'{k} {v:.4g}' for k, v in metrics.items()]
    parts += [f'{speed["steps_per_sec"]:.2f} steps/s',
              f'{speed["images_per_sec"]:.0f} img/s']
    if 'tflops_per_device' in speed:
      parts.append(f'{speed["tflops_per_device"]:.3g} TFLOP/s/device')
    # Model FLOP utilisation: only where the device's peak is known.
    parts.append(f'MFU {100 * speed["mfu"]:.1f}%' if 'mfu' in speed
                 else 'MFU n/a')
    if 'input_wait_share' in speed:
      parts.append(f'input wait {100 * speed["input_wait_share"]:.0f}%')
    parts.append(f'ETA {_format_duration(eta)}')
    return ' | '.join(parts)


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
