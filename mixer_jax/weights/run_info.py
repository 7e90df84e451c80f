"""`run_info.json`: the config, class count and names that let the programs
open a training workdir as a checkpoint without being told its config."""

import json
from typing import List, Optional

from mixer_jax import config_defaults
from mixer_jax.data.datasets import sources
from mixer_jax.weights import official_format
from mixer_jax.weights import registry

RUN_INFO_FILE = 'run_info.json'
_RUN_INFO_VERSION = 1


def save_run_info(workdir: str, config, num_classes: int,
                  class_names: Optional[List[str]] = None) -> str:
  """Writes `workdir/run_info.json` and returns its path; class names,
  unless given, come from the data set's TFDS features."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  if class_names is None:
    try:
      class_names = sources.class_names(config)
    except Exception:  # pylint: disable=broad-except
      class_names = None  # Names are a convenience; never fail the run.
  if class_names is not None and len(class_names) != num_classes:
    class_names = None  # A head larger than the data's labels: indices.
  info = {
      'format_version': _RUN_INFO_VERSION,
      'num_classes': int(num_classes),
      'class_names': class_names,
      'config': json.loads(config.to_json_best_effort()),
  }
  directory = epath.Path(workdir)
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / RUN_INFO_FILE
  partial = directory / f'.{RUN_INFO_FILE}.partial'
  partial.write_text(json.dumps(info, indent=1))
  partial.replace(path)  # Overwrites the file of an earlier start.
  return str(path)


def read_run_info(workdir: str) -> dict:
  """The parsed `run_info.json` of a workdir, with `config` a ConfigDict."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  path = epath.Path(workdir) / RUN_INFO_FILE
  if not path.exists():
    raise registry.CheckpointNotFoundError(
        f'{workdir} has no {RUN_INFO_FILE} (mixer_jax.train writes it), so it '
        'does not say which model it holds; use mixer_jax.evaluate '
        f"--config=<the run's config> --checkpoint={workdir}.")
  try:
    info = json.loads(path.read_text())
    saved = info['config']
  except (ValueError, KeyError, TypeError) as e:
    raise official_format.PretrainedError(
        f'{path} is damaged ({type(e).__name__}: {e}).') from e
  config = config_defaults.get_config()
  # Fields added to the defaults after the run keep their defaults; a field
  # the run saved that the defaults no longer define is kept as saved.
  with config.unlocked():
    config.update(saved)
  info['config'] = config
  return info
