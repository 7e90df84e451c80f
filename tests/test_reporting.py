"""Tests of mixer_jax.training.reporting: metrics.jsonl, TensorBoard, summary."""

import json
import os

import numpy as np

from mixer_jax.training import reporting


def test_json_lines_writer_appends_scalars(tmp_path):
  path = str(tmp_path / 'metrics.jsonl')
  writer = reporting.JsonLinesWriter(path)
  writer.write_hparams({'batch_size': 64, 'data_dir': None})
  writer.write_scalars(10, {'train_loss': np.float32(0.5), 'lr': 1e-3})
  writer.write_images(10, {'x': np.zeros((1, 2, 2, 3))})  # Not in the file.
  writer.close()
  writer = reporting.JsonLinesWriter(path)  # A resumed run appends.
  writer.write_scalars(20, {'eval_accuracy': 0.75})
  writer.close()
  with open(path) as f:
    lines = [json.loads(line) for line in f]
  assert lines[0] == {'hparams': {'batch_size': 64, 'data_dir': None}}
  assert lines[1] == {'step': 10, 'train_loss': 0.5, 'lr': 1e-3}
  assert reporting.read_metrics(str(tmp_path)) == lines[1:]


def test_create_writer_writes_tensorboard_and_json(tmp_path):
  writer = reporting.create_writer(str(tmp_path))
  writer.write_scalars(1, {'train_loss': 2.0})
  writer.close()
  assert any('tfevents' in name for name in os.listdir(tmp_path))
  assert reporting.read_metrics(str(tmp_path)) == [{'step': 1,
                                                    'train_loss': 2.0}]


def test_summary_is_readable():
  text = reporting.format_summary({'steps': 10, 'best_eval_accuracy': 0.98,
                                   'workdir': '/tmp/x'})
  assert text.splitlines()[0] == 'Training summary:'
  assert '  best_eval_accuracy  0.9800' in text


def _lines(path):
  with open(path) as f:
    return f.read()


def test_rewind_drops_later_steps_and_a_torn_line(tmp_path):
  path = str(tmp_path / 'metrics.jsonl')
  writer = reporting.JsonLinesWriter(path)
  writer.write_hparams({'batch_size': 8})
  for step in (10, 20, 30):
    writer.write_scalars(step, {'train_loss': step / 10})
  writer.close()
  with open(path, 'a') as f:  # kill -9 in the middle of a line.
    f.write('{"step": 40, "train_lo')
  # The torn line does not break reading.
  assert [r['step'] for r in reporting.read_metrics(str(tmp_path))] == [
      10, 20, 30]
  assert reporting.rewind(path, 20) == 2  # Resumed from step 20.
  writer = reporting.JsonLinesWriter(path)
  writer.write_scalars(30, {'train_loss': 3.5})
  writer.close()
  assert reporting.read_metrics(str(tmp_path)) == [
      {'step': 10, 'train_loss': 1.0}, {'step': 20, 'train_loss': 2.0},
      {'step': 30, 'train_loss': 3.5}]
  assert _lines(path).startswith('{"hparams"')
  assert not os.path.exists(path + '.rewind.tmp')
  before = os.stat(path).st_ino
  assert reporting.rewind(path, 30) == 0  # Nothing to drop: untouched.
  assert os.stat(path).st_ino == before
  assert reporting.rewind(path, 0) == 4  # Back to step 0: all goes.
  assert _lines(path) == ''


def test_a_torn_line_in_the_middle_is_skipped(tmp_path):
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    f.write('{"step": 1, "a": 1}\n{"step": 2, "a{"step": 2, "a": 2}\n'
            '[1, 2]\n{"step": 3, "a": 3}\n')
  assert [r['step'] for r in reporting.read_metrics(str(tmp_path))] == [1, 3]


def test_create_writer_rewinds_its_json_lines(tmp_path):
  writer = reporting.create_writer(str(tmp_path))
  writer.write_scalars(1, {'x': 1.0})
  writer.write_scalars(2, {'x': 2.0})
  writer.close()
  writer = reporting.create_writer(str(tmp_path), start_step=1)
  writer.write_scalars(2, {'x': 2.5})
  writer.close()
  assert reporting.read_metrics(str(tmp_path)) == [{'step': 1, 'x': 1.0},
                                                   {'step': 2, 'x': 2.5}]


def test_rewind_of_a_file_not_yet_written(tmp_path):
  assert reporting.rewind(str(tmp_path / 'metrics.jsonl'), 0) == 0
  writer = reporting.JsonLinesWriter(str(tmp_path / 'metrics.jsonl'))
  writer.write_scalars(1, {'x': 1.0})
  writer.close()
  assert reporting.read_metrics(str(tmp_path)) == [{'step': 1, 'x': 1.0}]


def test_a_line_that_is_not_utf8_is_skipped_by_reading_and_rewind(tmp_path):
  # `printf '\xff\n' >> metrics.jsonl`: a damaged byte, not a torn line.
  path = str(tmp_path / 'metrics.jsonl')
  with open(path, 'wb') as f:
    f.write(b'{"step": 1, "a": 1}\n\xff\n{"step": 2, "a": 2}\n'
            b'{"step": 3, "name": "caf\xc3\xa9"}\n')
  assert reporting.read_metrics(str(tmp_path)) == [
      {'step': 1, 'a': 1}, {'step': 2, 'a': 2}, {'step': 3, 'name': 'café'}]
  assert reporting.rewind(path, 2) == 2  # The bad line and step 3.
  with open(path, 'rb') as f:
    assert f.read() == b'{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n'
