"""A resumed run's schedule: the data position and learning rate are
counted in steps, so another batch size or step count changes both."""

from absl import logging
from etils import epath

from mixer_jax.errors import UserError
from mixer_jax.training import config_validation
from mixer_jax.weights import run_info


def has_saved_steps(checkpoint_dir: str) -> bool:
  path = epath.Path(checkpoint_dir)
  return path.is_dir() and any(p.name.isdigit() for p in path.iterdir())


def check_schedule_unchanged(config, workdir: str, checkpoint_dir: str,
                             num_train_steps: int) -> None:
  """ConfigError for another batch size or step count than run_info.json's."""
  if config.allow_changed_schedule or not has_saved_steps(checkpoint_dir):
    return
  try:
    saved = run_info.read_run_info(workdir)['config']
  except UserError as e:  # Missing or damaged: rewritten.
    logging.warning('Cannot compare the schedule with the saved run: %s', e)
    return
  changes = []
  if int(saved.batch_size) != int(config.batch_size):
    changes.append(f'batch_size {saved.batch_size} -> {config.batch_size}')
  if saved.num_train_steps > 0:
    if int(saved.num_train_steps) != num_train_steps:
      changes.append(f'num_train_steps {saved.num_train_steps} -> '
                     f'{num_train_steps}')
  elif config.num_train_steps > 0:  # The saved run counted epochs (-1).
    changes.append(f'num_epochs {saved.num_epochs} -> num_train_steps '
                   f'{num_train_steps}')
  elif float(saved.num_epochs) != float(config.num_epochs):
    changes.append(f'num_epochs {saved.num_epochs} -> {config.num_epochs}')
  if changes:
    raise config_validation.ConfigError(
        f'{workdir} holds a run with another schedule ({"; ".join(changes)}).'
        ' Its data position and learning-rate schedule are counted in '
        'steps, so resuming would change their meaning. Use the same '
        'values, another --workdir, or --config.allow_changed_schedule=True '
        'to resume anyway. Nothing in the workdir was changed.')
