"""One notion of "a checkpoint" for every command: `load(spec)`, any kind
docs/weights.md lists; every model takes images in [-1, 1]."""

import os
from typing import Optional

from mixer_jax.checkpointing import checkpoint_checks
from mixer_jax.data import preprocess_choices
from mixer_jax.weights import official_format
from mixer_jax.weights import pretrained
from mixer_jax.weights import workdir_checkpoint
from mixer_jax.weights.loaded import Loaded


def load(spec, *, step: Optional[int] = None,
         image_size: Optional[int] = None, num_classes: Optional[int] = None,
         weights: str = 'params', **model_options) -> Loaded:
  """Loads any kind of checkpoint. `step` and `weights` ('params' or 'ema')
  apply to workdirs, `num_classes` and `image_size` to weight files (see
  `load_pretrained`); `model_options` are e.g. dtype and gelu_approximate."""
  if workdir_checkpoint.is_directory(spec):
    if num_classes is not None:
      raise checkpoint_checks.CheckpointError(
          'num_classes applies to weight files; use Loaded.features() for a '
          'workdir without its head.')
    return workdir_checkpoint.load(os.fspath(spec), step, image_size,
                                   model_options, weights)
  if step is not None or weights != 'params':
    raise checkpoint_checks.CheckpointError(
        f'step={step} and weights={weights!r} apply to training workdirs '
        f'only; {spec} is a weight file or name.')
  read = pretrained.read_weights(spec)
  model, params = pretrained.load_pretrained(
      read, num_classes=num_classes, image_size=image_size, **model_options)
  size = image_size or official_format.infer_architecture(read.flat).image_size
  loaded = Loaded(
      model=model, params=params, kind=read.kind, source=read.source,
      image_size=size, eval_crop='resize_crop',
      eval_resize=preprocess_choices.imagenet_eval_resize(size),
      entry=read.entry, dataset=getattr(read.entry, 'dataset', None))
  if read.timm is not None:  # Its config.json's preprocessing and names.
    loaded.eval_crop = read.timm.eval_crop
    loaded.eval_resize = read.timm.eval_resize(size)
    if len(read.timm.label_names or ()) == loaded.num_classes:
      loaded.class_names = read.timm.label_names
    loaded.dataset = 'imagenet2012' if loaded.num_classes == 1000 else None
  return loaded
