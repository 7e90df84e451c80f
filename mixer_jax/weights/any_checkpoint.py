"""One notion of "a checkpoint" for every command: `load(spec)`.

`spec` is a training workdir (its newest Orbax step, or `step=K`; also its
`checkpoints/` or one step directory in it; read-only, so a running job can
be used; its `run_info.json` gives config, class count and names), an
official `.npz` (local or `gs://`), a registry name ("imagenet1k/Mixer-B_16"),
a Hub name ("hf-hub:timm/mixer_b16_224.goog_in21k_ft_in1k[@revision]"), a
timm-format `.safetensors`, or a folder holding one as `model.safetensors`
with its `config.json` (what `mixer_jax.export --format=hub` writes). A
weight file is read as what its first bytes say it is, whatever its suffix.
Every model takes images scaled to [-1, 1] (`preprocess.eval_image`).
"""

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
  """Loads any kind of checkpoint (see the module docstring).

  Args:
    spec: workdir (or its checkpoint/step directory), `.npz`, registry
      name, Hub name, `.safetensors` file or Hub folder.
    step: Orbax step of a workdir (default: the newest).
    image_size: input side; None keeps the checkpoint's. For weight files
      an integer multiple expands the token mixing (paper, Appendix C).
    num_classes: weight files only: None keeps the head, another count
      gives a fresh zero head, 0 drops it (see `load_pretrained`).
    weights: a workdir's 'params' (trained) or 'ema' (their moving average,
      config.ema_decay > 0).
    **model_options: e.g. dtype, gelu_approximate (see `load_pretrained`).
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
  size = image_size or official_format.infer_architecture(read.flat).image_size
  loaded = Loaded(
      model=model, params=params, kind=read.kind, source=read.source,
      image_size=size, eval_crop='resize_crop',
      eval_resize=preprocess_choices.imagenet_eval_resize(size),
      entry=read.entry, dataset=getattr(read.entry, 'dataset', None))
  if read.timm is not None:  # Its config.json's preprocessing and names.
    names = read.timm.label_names
    loaded.eval_crop = read.timm.eval_crop
    loaded.eval_resize = read.timm.eval_resize(size)
    if len(names or ()) == loaded.num_classes:
      loaded.class_names = names
    loaded.dataset = 'imagenet2012' if loaded.num_classes == 1000 else None
  return loaded
