"""One notion of "a checkpoint" for every command: `load(spec)`.

`spec` is any of:
- a training workdir (`workdirs/quickstart`): its newest Orbax step, or
  `step=K`; also its `checkpoints/` directory or one step directory in it
  (`.../checkpoints/500`). Opened read-only, so a running job can be used.
  The workdir describes itself: `mixer_jax.train` writes `run_info.json`
  (the run's config, class count and class names) when it starts, so the
  image size, eval preprocessing and class names come with it;
- an official-format `.npz` (local or `gs://`);
- a registry name ("imagenet1k/Mixer-B_16", see `mixer_jax.weights.registry`);
- a Hub name ("hf-hub:timm/mixer_b16_224.goog_in21k_ft_in1k[@revision]",
  see `mixer_jax.weights.hub`);
- a timm-format `.safetensors` file (`timm_format.export_timm`, or timm's),
  or a folder holding one as `model.safetensors` with its `config.json` (a
  Hub repository's files, as `mixer_jax.export --format=hub` writes them).
A weight file is read as what its first bytes say it is (`.npz` or
safetensors), whatever its suffix (`official_format.file_kind`).

`load` returns a `Loaded`: the model and parameters plus what a command
needs to use them (input size, eval crop, class names). predict, evaluate,
export and fewshot all go through it. Every model takes images scaled to
[-1, 1] (`preprocess.eval_image`). This module only dispatches: workdirs
are opened by `workdir_checkpoint.py` (their `run_info.json` by
`run_info.py`), weight files and names by `pretrained.py`.
"""

import os
from typing import Optional

from flax import traverse_util

from mixer_jax.checkpointing import checkpoint_checks
from mixer_jax.data import preprocess_choices
from mixer_jax.weights import hub
from mixer_jax.weights import official_format
from mixer_jax.weights import pretrained
from mixer_jax.weights import workdir_checkpoint
from mixer_jax.weights.loaded import Loaded


def load(spec, *, step: Optional[int] = None,
         image_size: Optional[int] = None, num_classes: Optional[int] = None,
         weights: str = 'params', **model_options) -> Loaded:
  """Loads any kind of checkpoint (see the module docstring).

  Args:
    spec: workdir (or its checkpoint/step directory), `.npz`, registry
      name, Hub name or `.safetensors` file.
    step: Orbax step of a workdir (default: the newest); an error for the
      other kinds.
    image_size: input side; None keeps the checkpoint's. For weight files
      an integer multiple expands the token mixing (paper, Appendix C).
    num_classes: weight files only: None keeps the head, another count
      gives a fresh zero head, 0 drops it (see `load_pretrained`).
    weights: a workdir's 'params' (trained) or 'ema' (their moving average,
      config.ema_decay > 0); weight files have only 'params'.
    **model_options: e.g. dtype, gelu_approximate (see `load_pretrained`).

  Returns:
    A `Loaded`.
  """
  if workdir_checkpoint.is_directory(spec):
    if num_classes is not None:
      raise checkpoint_checks.CheckpointError(
          'num_classes applies to weight files; use Loaded.features() for a '
          'workdir without its head.')
    return workdir_checkpoint.load(os.fspath(spec), step, image_size,
                                   model_options, weights)
  if weights != 'params':
    raise checkpoint_checks.CheckpointError(
        f'weights={weights!r} applies to training workdirs only; {spec} '
        'holds one set of weights.')
  if step is not None:
    raise checkpoint_checks.CheckpointError(
        f'step={step} applies to training workdirs only; {spec} is a weight '
        'file or name.')
  read = pretrained.read_weights(spec)
  model, params = pretrained.load_pretrained(
      read, num_classes=num_classes, image_size=image_size, **model_options)
  size = image_size or official_format.infer_architecture(
      traverse_util.flatten_dict(params, sep='/')).image_size
  if read.hub is not None:
    hub_info = read.hub.info
    kind = 'hub' if hub.is_hub_name(str(read.source)) else 'timm'
    names = hub_info.label_names
    if names is not None and len(names) != (model.num_classes or 0):
      names = None
    dataset = 'imagenet2012' if (model.num_classes == 1000) else None
    return Loaded(model=model, params=params, kind=kind, source=read.source,
                  image_size=size, eval_crop=hub_info.eval_crop,
                  eval_resize=hub_info.eval_resize(size), class_names=names,
                  dataset=dataset)
  entry = read.entry
  return Loaded(
      model=model, params=params,
      kind='registry' if entry is not None else 'official',
      source=read.source, image_size=size, eval_crop='resize_crop',
      eval_resize=preprocess_choices.imagenet_eval_resize(size),
      dataset=entry.dataset if entry is not None else None, entry=entry)
