"""A training workdir as a checkpoint: where its steps are, and restoring one
read-only (a running job can be read); `run_info.json` names its model."""

import contextlib
import os
from typing import Optional

from mixer_jax.checkpointing import checkpoint_checks
from mixer_jax.checkpointing import checkpoints
from mixer_jax.checkpointing.checkpoints import CHECKPOINT_DIR
from mixer_jax.checkpointing import fingerprint
from mixer_jax import model_from_config
from mixer_jax import models
from mixer_jax.weights import hub
from mixer_jax.weights.loaded import Loaded
from mixer_jax.weights import registry
from mixer_jax.weights import run_info


def _is_step_directory(location) -> bool:
  return location.name.isdigit() and (location / checkpoints.STATE_ITEM
                                      ).is_dir()


def locate_workdir(path: str, step: Optional[int] = None):
  """(workdir, checkpoint directory, step) of a workdir, its `checkpoints/`,
  one step directory (it fixes the step) or any directory of Orbax steps."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  location = epath.Path(path)
  if (location / CHECKPOINT_DIR).is_dir() or (location / run_info.RUN_INFO_FILE
                                              ).exists():
    return str(location), str(location / CHECKPOINT_DIR), step
  if location.name.isdigit() and (location.parent.name == CHECKPOINT_DIR or
                                  _is_step_directory(location)):
    if step is not None and step != int(location.name):
      raise checkpoint_checks.CheckpointError(
          f'{path} is step {location.name} but step={step} was asked for.')
    directory = location.parent
    workdir = (directory.parent if directory.name == CHECKPOINT_DIR
               else directory)
    return str(workdir), str(directory), int(location.name)
  if location.name == CHECKPOINT_DIR:
    return str(location.parent), str(location), step
  if location.is_dir() and any(
      _is_step_directory(child) for child in location.iterdir()):
    return str(location), str(location), step
  raise registry.CheckpointNotFoundError(
      f'{path} is a directory but not a mixer_jax training workdir (no '
      f'{CHECKPOINT_DIR}/ or {run_info.RUN_INFO_FILE} in it) nor an Orbax '
      'checkpoint directory.')


def is_directory(spec) -> bool:
  """Whether `spec` names a workdir-like directory, not a weight file."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  if not isinstance(spec, (str, os.PathLike)):
    return False
  spec = os.fspath(spec)
  if (hub.is_hub_name(spec) or spec.endswith(('.npz', '.safetensors')) or
      hub.is_folder(spec)):  # A Hub folder is read as a weight file.
    return False
  try:
    return epath.Path(spec).is_dir()
  except Exception:  # pylint: disable=broad-except
    return False


def restore_params(directory, config, num_classes: int,
                   step: Optional[int], sharding, weights: str = 'params'):
  """(model, params, extra) of a step (None: the newest) of `directory`,
  read-only, placed with `sharding`; `weights` is 'params' or 'ema'."""
  if weights not in ('params', 'ema'):
    raise ValueError(f"weights={weights!r}: use 'params' or 'ema'.")
  if weights == 'ema' and not config.get('ema_decay'):
    raise checkpoint_checks.CheckpointError(
        f'{directory} was trained without an EMA of the weights '
        '(config.ema_decay=0): use the trained weights (--weights=params).')
  import jax  # pylint: disable=g-import-not-at-top
  model = model_from_config.create_model(config, num_classes)
  target = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
      models.param_shapes(model, config.image_size))
  reader = checkpoints.Checkpointer(
      directory, keep=1, keep_best=False, async_save=False, read_only=True,
      fingerprint=fingerprint.model_fingerprint(config, num_classes))
  with contextlib.closing(reader):
    params, extra = reader.restore_params(
        target, step=step,
        field='ema_params' if weights == 'ema' else 'params')
  return model, params, extra


def load(spec, step, image_size, model_options, weights) -> Loaded:
  """Restores the parameters of a workdir's Orbax step (read-only)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  workdir, directory, step = locate_workdir(spec, step)
  info = run_info.read_run_info(workdir)
  config, num_classes = info['config'], int(info['num_classes'])
  if image_size not in (None, config.image_size):
    raise checkpoint_checks.CheckpointError(
        f'{workdir} was trained at image_size={config.image_size}; it cannot '
        f'be loaded at {image_size} (export it with pretrained.'
        'export_official and use load_pretrained for a resolution change).')
  model, params, extra = restore_params(
      directory, config, num_classes, step,
      jax.sharding.SingleDeviceSharding(jax.local_devices()[0]), weights)
  if 'dtype' in model_options:
    model = model.clone(dtype=jnp.dtype(model_options['dtype']))
  if 'gelu_approximate' in model_options:
    model = model.clone(gelu_approximate=model_options['gelu_approximate'])
  step = int(extra['step'])
  return Loaded(
      model=model, params=params, kind='workdir',
      source=f'{workdir} step {step}' + (' (EMA weights)'
                                          if weights == 'ema' else ''),
      image_size=int(config.image_size),
      eval_crop=config.pp.eval_crop, eval_resize=int(config.pp.eval_resize),
      class_names=info.get('class_names'), dataset=config.dataset, step=step,
      config=config)
