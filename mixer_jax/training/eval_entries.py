"""What data a `config.evals` entry scores: data set, split, labels.

One reading for the data checks before training (data_checks.py) and the
evaluations during it (evals.py). An entry with no `dataset` and the
default `label_key` scores the run's own data set (a folder or the built-in
digits included); any other names a TFDS data set and a label feature of it
(`real_label` for ImageNet ReaL: a set of labels per image).
"""

import dataclasses

from mixer_jax.data.datasets import sources


@dataclasses.dataclass(frozen=True)
class EntryData:
  """The data of one eval entry.

  Attributes:
    dataset: the data set's name.
    split: the split scored.
    label_key: the feature holding the label(s).
    is_run_data: whether it is the run's own data set and label.
  """
  dataset: str
  split: str
  label_key: str
  is_run_data: bool


def entry_data(config, entry) -> EntryData:
  """The data set, split and labels `entry` scores ('' fields: the run's)."""
  dataset = entry.dataset or config.dataset
  return EntryData(
      dataset=dataset, split=entry.split or config.eval_split,
      label_key=entry.label_key,
      is_run_data=dataset == config.dataset and entry.label_key == 'label')


def entry_source(config, data: EntryData, run_source=None):
  """The source to read `data` from (`run_source`: the run's, if open).

  Raises:
    ValueError: a label_key the data set does not have.
  """
  if data.is_run_data:
    return run_source or sources.get_source(config)
  return sources.TfdsSource(data.dataset, config.data_dir,
                            label_key=data.label_key)
