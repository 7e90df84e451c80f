"""The shot counts of a few-shot probe: checked, and honest when too big."""

from absl import logging as absl_logging
import numpy as np
import pytest

from mixer_jax import fewshot
from mixer_jax.training import linear_probe
from mixer_jax.training import errors


@pytest.mark.parametrize('text', ['0', 'abc', '', '5,-1', '1,,x'])
def test_bad_shots_flag_is_a_user_error(text):
  with pytest.raises(errors.UsageError, match='each >= 1'):
    fewshot.parse_shots(text)


def test_shots_flag():
  assert fewshot.parse_shots('1,5, 10') == (1, 5, 10)


def _clusters(per_class):
  rng = np.random.default_rng(0)
  y = np.repeat(np.arange(len(per_class)), per_class)
  x = np.eye(len(per_class))[y] * 5 + rng.normal(size=(len(y),
                                                       len(per_class)))
  return x, y


def test_zero_shots_is_refused():
  x, y = _clusters([6, 6, 6])
  with pytest.raises(ValueError, match='>= 1'):
    linear_probe.probe_accuracies(x, y, x, y, 3, shots=(0,), l2_reg=2.0**10,
                                  num_seeds=1)


def test_more_shots_than_a_class_has_warns(monkeypatch):
  x, y = _clusters([20, 4, 20])  # Class 1 has 4 training examples.
  warnings = []
  monkeypatch.setattr(absl_logging, 'warning',
                      lambda msg, *args: warnings.append(msg % args))
  linear_probe.probe_accuracies(x, y, x, y, 3, shots=(3, 10), l2_reg=2.0**10,
                                num_seeds=1)
  assert len(warnings) == 1, warnings  # 3-shot fits every class.
  assert warnings[0].startswith('10-shot: 1 of 3 classes have fewer than 10')
  assert 'the smallest has 4' in warnings[0]
