"""Split sizes for `tfds.testing.mock_data`, written as a builder's metadata.

mock_data reads the number of examples of each split from the builder's
dataset_info; without network access the tests write it themselves.
"""

import os

import tensorflow_datasets as tfds


def write_split_sizes(name, data_dir, splits, num_examples):
  """Writes `num_examples` per split ('train' 10x, so 1% slices are not empty)."""
  builder = tfds.builder(name, data_dir=data_dir)
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(
          name=s, shard_lengths=[num_examples * (10 if s == 'train' else 1)],
          num_bytes=0)
      for s in splits]))
  os.makedirs(builder.data_dir, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)
