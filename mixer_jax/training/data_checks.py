"""Checks of the data a training run reads, all before the first step.

Everything that would otherwise fail after compiling, or in the first
evaluation hours later: the splits (each process gets a training example,
a batch fits the training split), the class count against the head, and
every config.evals entry's data. Each failure is one `ConfigError` (or the
source's DatasetUnavailableError / BadImagesError) naming the field.
"""

from typing import Optional

from mixer_jax.data.datasets import sources
from mixer_jax.data import input_pipeline
from mixer_jax.training.config_validation import ConfigError
from mixer_jax.training import evals


_SPLIT_HELP = ("Split strings are a split name ('train'), a slice "
               "('train[:90%]', 'train[100:200]') or a sum ('train+test').")


def _sizes(source) -> str:
  return ', '.join(f'{name} ({n})' for name, n in
                   sorted(source.split_sizes().items()))


def split_size(source, split: str, field: str, *, num_processes: int = 1,
               training: bool = False) -> int:
  """Examples of `split` in `source`; ConfigError naming `field` if unusable.

  `training`: every process needs an example (an evaluation one in all).
  """
  try:
    n = source.num_examples(split)
    smallest = (min(source.shard_size(split, i, num_processes)
                    for i in range(num_processes)) if training else n)
  except (sources.DatasetUnavailableError, sources.BadImagesError):
    raise
  except (ValueError, KeyError, AssertionError, TypeError) as e:
    reason = str(e).strip().split('\n', 1)[0][:200]
    raise ConfigError(
        f'{field}={split!r} is not a split of {source.name} ({reason}). Its '
        f'splits are: {_sizes(source)}. {_SPLIT_HELP}') from None
  if n <= 0:
    raise ConfigError(
        f'{field}={split!r} selects no examples of {source.name} (its '
        f'splits: {_sizes(source)}); choose a non-empty split or slice.')
  if smallest <= 0:
    raise ConfigError(
        f'{field}={split!r} has {n} example(s) of {source.name}, fewer than '
        f'the {num_processes} processes that share it; use a larger split.')
  return n


def _head_classes(config, source) -> int:
  """`input_pipeline.head_classes`, its problems as a ConfigError."""
  try:
    return input_pipeline.head_classes(config, source)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def check_evals(config, head_classes: int, main_source=None) -> None:
  """Checks every config.evals entry's data (see the module docstring)."""
  entries = config.evals.items()
  for name, entry in entries:
    field = f'evals.{name}'
    try:
      if entry.kind == 'fewshot':
        for key, (tfds_name, train_split, test_split) in (
            entry.fewshot_datasets.items()):
          source = sources.TfdsSource(tfds_name, config.data_dir)
          if source.num_classes <= 0:
            raise ConfigError(f'{field}.fewshot_datasets.{key}: {tfds_name}'
                              ' has no class label for a few-shot probe.')
          split_size(source, train_split,
                     f'{field}.fewshot_datasets.{key} train split')
          split_size(source, test_split,
                     f'{field}.fewshot_datasets.{key} test split')
        continue
      try:
        source, split = evals.entry_source(config, entry, main_source)
      except ValueError as e:  # A label_key the data set lacks.
        raise ConfigError(str(e)) from None
      data_classes = source.num_classes
      split_size(source, split, f'{field}.split' if entry.split else
                 f'{field} (eval_split)')
    except ConfigError as e:
      if str(e).startswith(field):
        raise
      raise ConfigError(f'{field}: {e}') from None
    except sources.DatasetUnavailableError as e:
      raise sources.DatasetUnavailableError(f'{field}: {e}') from None
    if data_classes > head_classes:
      raise ConfigError(
          f'{field}: {source.name} has {data_classes} classes but the head '
          f'has {head_classes} (num_classes); its labels would not fit.')


def checked_dataset_info(config, num_processes: Optional[int] = None):
  """`input_pipeline.dataset_info(config)` after every data check."""
  if num_processes is None:
    import jax  # pylint: disable=g-import-not-at-top
    num_processes = jax.process_count()
  source = sources.get_source(config)
  # Undecodable images of both splits in one error, not the eval split's
  # only after the train split was cleaned up.
  bad_images = []
  for split, field, training in ((config.train_split, 'train_split', True),
                                 (config.eval_split, 'eval_split', False)):
    try:
      examples = split_size(source, split, field, num_processes=num_processes,
                            training=training)
    except sources.BadImagesError as e:
      bad_images.append(str(e))
      continue
    if training and config.batch_size > examples:
      raise ConfigError(
          f'batch_size={config.batch_size:,} is larger than train_split='
          f'{split!r} ({examples:,} examples of {source.name}); use a '
          f'batch_size of at most {examples:,} or a larger split.')
  if bad_images:
    raise sources.BadImagesError('\n'.join(bad_images))
  head_classes = _head_classes(config, source)
  check_evals(config, head_classes, main_source=source)
  return input_pipeline.dataset_info(config)
