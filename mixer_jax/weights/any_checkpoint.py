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
- a timm-format `.safetensors` file (`timm_format.export_timm`, or timm's).

`load` returns a `Loaded`: the model and parameters plus what a command
needs to use them (input size, eval crop, class names). predict, evaluate,
export and fewshot all go through it. Every model takes images scaled to
[-1, 1] (`preprocess.eval_image`).
"""

import dataclasses
import json
import os
from typing import Any, List, Optional

from flax import traverse_util

from mixer_jax import config_defaults
from mixer_jax import models
from mixer_jax.checkpointing import checkpoint_checks
from mixer_jax.weights import official_format
from mixer_jax.weights import pretrained
from mixer_jax.weights import registry

RUN_INFO_FILE = 'run_info.json'
# Which weights of a training workdir: trained, or their EMA.
WEIGHTS = ('params', 'ema')
CHECKPOINT_DIR = 'checkpoints'  # Subdirectory of a training workdir.
_RUN_INFO_VERSION = 1
# The official ImageNet evaluation: short side to 256, central 224 crop.
_IMAGENET_RESIZE_RATIO = 256 / 224


@dataclasses.dataclass
class Loaded:
  """A checkpoint ready to use.

  Attributes:
    model: the Mixer (`model.apply({'params': params}, images)`, images in
      [-1, 1]).
    params: its parameters (NumPy or JAX arrays).
    kind: 'workdir', 'registry', 'hub', 'timm' or 'official'.
    source: what was loaded, for messages (path or name, and step).
    image_size: the input side the weights were trained or evaluated at.
    eval_crop: 'resize' (plain resize) or 'resize_crop' (short side to
      `eval_resize`, central crop): the evaluation preprocessing that goes
      with the weights (`preprocess.eval_image`).
    eval_resize: short side before the central crop.
    class_names: names of the head's classes when the checkpoint knows them
      (a workdir's data set, a Hub config's label_names), else None.
    dataset: what the head predicts, when known ('imagenet2012',
      'imagenet21k', or the workdir's config.dataset).
    step: the Orbax step of a workdir.
    config: the run's config, for a workdir.
    entry: the registry entry, for registry names.
  """
  model: models.MlpMixer
  params: Any
  kind: str
  source: str
  image_size: int
  eval_crop: str
  eval_resize: int
  class_names: Optional[List[str]] = None
  dataset: Optional[str] = None
  step: Optional[int] = None
  config: Any = None
  entry: Optional[registry.Checkpoint] = None

  @property
  def num_classes(self) -> int:
    return int(self.model.num_classes or 0)

  def features(self):
    """(model, params) returning the pooled pre-logits features (no head).

    What a linear probe (fewshot) needs.
    """
    params = {k: v for k, v in official_format.unwrap(self.params).items()
              if k != 'head'}
    return self.model.clone(num_classes=None), params


# ------------------------------------------------------------ Run info.


def _class_names_of(config) -> Optional[List[str]]:
  """Class names from the TFDS features of the run's data set, if named."""
  from mixer_jax.data.datasets import sources  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  source = sources.get_source(config)
  names = getattr(source, 'class_names', None)
  if names is None and getattr(source, 'builder', None) is not None:
    features = source.builder.info.features
    key = getattr(source, 'label_key', 'label')
    feature = features[key] if key in features else None
    if isinstance(feature, tfds.features.ClassLabel):
      names = feature.names
  return [str(n) for n in names] if names else None


def save_run_info(workdir: str, config, num_classes: int,
                  class_names: Optional[List[str]] = None) -> str:
  """Writes `workdir/run_info.json`, which makes the workdir a checkpoint.

  Called by `mixer_jax.train` at the start of every run (on process 0):
  the config (to rebuild the model and restore the Orbax state), the class
  count, and the class names read from the data set's TFDS features (e.g.
  the folder names of a `folder` data set) unless given.

  Returns:
    The path written.
  """
  from etils import epath  # pylint: disable=g-import-not-at-top
  if class_names is None:
    try:
      class_names = _class_names_of(config)
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
        f'{workdir} is a directory without {RUN_INFO_FILE}, so it does not '
        'say which model it holds. mixer_jax.train writes that file when a '
        'run starts; for a run trained before it did, use mixer_jax.evaluate '
        '--config=<the run\'s config> --checkpoint=' + str(workdir) + '.')
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


# -------------------------------------------------------------- Loading.


def locate_workdir(path: str, step: Optional[int] = None):
  """(workdir, checkpoint directory, step) for a workdir-like directory.

  Accepts a workdir, its `checkpoints/` directory or a step directory.

  Raises:
    registry.CheckpointNotFoundError: not such a directory.
    checkpoint_checks.CheckpointError: a step directory together with
      another `step`.
  """
  from etils import epath  # pylint: disable=g-import-not-at-top
  location = epath.Path(path)
  if (location / CHECKPOINT_DIR).is_dir() or (location / RUN_INFO_FILE
                                              ).exists():
    return str(location), str(location / CHECKPOINT_DIR), step
  if location.name == CHECKPOINT_DIR:
    return str(location.parent), str(location), step
  if location.name.isdigit() and location.parent.name == CHECKPOINT_DIR:
    if step is not None and step != int(location.name):
      raise checkpoint_checks.CheckpointError(
          f'{path} is step {location.name} but step={step} was asked for.')
    return str(location.parent.parent), str(location.parent), int(
        location.name)
  raise registry.CheckpointNotFoundError(
      f'{path} is a directory but not a mixer_jax training workdir (no '
      f'{CHECKPOINT_DIR}/ or {RUN_INFO_FILE} in it).')


def is_directory(spec) -> bool:
  from etils import epath  # pylint: disable=g-import-not-at-top
  if not isinstance(spec, (str, os.PathLike)):
    return False
  spec = os.fspath(spec)
  if spec.startswith(('hf-hub:', 'hf_hub:')) or spec.endswith(
      ('.npz', '.safetensors')):
    return False
  try:
    return epath.Path(spec).is_dir()
  except Exception:  # pylint: disable=broad-except
    return False


def restore_params(directory, config, num_classes: int,
                   step: Optional[int], sharding, weights: str = 'params'):
  """(model, params, extra) of an Orbax step of `directory`, read-only.

  Args:
    directory: the run's checkpoint directory.
    config: the run's config (the model it describes is rebuilt).
    num_classes: the run's head size.
    step: the step; None for the newest.
    sharding: where every parameter is placed.
    weights: 'params' (the trained weights) or 'ema' (their moving average,
      kept by runs with config.ema_decay > 0).
  """
  if weights not in WEIGHTS:
    raise ValueError(f'weights={weights!r}: use one of {WEIGHTS}.')
  if weights == 'ema' and not config.get('ema_decay'):
    raise checkpoint_checks.CheckpointError(
        f'{directory} was trained without an EMA of the weights '
        '(config.ema_decay=0): use the trained weights (--weights=params).')
  import jax  # pylint: disable=g-import-not-at-top
  from mixer_jax.checkpointing import checkpoints  # pylint: disable=g-import-not-at-top
  from mixer_jax.training import train_steps  # pylint: disable=g-import-not-at-top

  model = train_steps.create_model(config, num_classes)
  target = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
      models.param_shapes(model, config.image_size))
  reader = checkpoints.Checkpointer(
      directory, keep=1, keep_best=False, async_save=False, read_only=True,
      fingerprint=checkpoint_checks.model_fingerprint(config, num_classes))
  try:
    params, extra = reader.restore_params(
        target, step=step,
        field='ema_params' if weights == 'ema' else 'params')
  finally:
    reader.close()
  return model, params, extra


def _load_workdir(spec, step, image_size, model_options, weights):
  """Restores the parameters of a workdir's Orbax step (read-only)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  workdir, directory, step = locate_workdir(spec, step)
  info = read_run_info(workdir)
  config, num_classes = info['config'], int(info['num_classes'])
  if image_size not in (None, config.image_size):
    raise checkpoint_checks.CheckpointError(
        f'{workdir} was trained at image_size={config.image_size}; it cannot '
        f'be loaded at {image_size} (export it with pretrained.'
        'export_official and use load_pretrained for a resolution change).')
  model, params, extra = restore_params(
      directory, config, num_classes, step,
      jax.sharding.SingleDeviceSharding(jax.local_devices()[0]), weights)
  options = {k: v for k, v in model_options.items()
             if k in ('dtype', 'gelu_approximate')}
  if options:
    if 'dtype' in options:
      options['dtype'] = jnp.dtype(options['dtype'])
    model = model.clone(**options)
  step = int(extra['step'])
  return Loaded(
      model=model, params=params, kind='workdir',
      source=f'{workdir} step {step}' + (' (EMA weights)'
                                          if weights == 'ema' else ''),
      image_size=int(config.image_size),
      eval_crop=config.pp.eval_crop, eval_resize=int(config.pp.eval_resize),
      class_names=info.get('class_names'), dataset=config.dataset, step=step,
      config=config)


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
  if is_directory(spec):
    if num_classes is not None:
      raise checkpoint_checks.CheckpointError(
          'num_classes applies to weight files; use Loaded.features() for a '
          'workdir without its head.')
    return _load_workdir(os.fspath(spec), step, image_size, model_options,
                         weights)
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
    kind = 'hub' if str(read.source).startswith('hf-hub:') else 'timm'
    names = hub_info.label_names
    if names is not None and len(names) != (model.num_classes or 0):
      names = None
    dataset = 'imagenet2012' if (model.num_classes == 1000) else None
    return Loaded(model=model, params=params, kind=kind, source=read.source,
                  image_size=size, eval_crop='resize_crop',
                  eval_resize=hub_info.eval_resize(size), class_names=names,
                  dataset=dataset)
  entry = read.entry
  return Loaded(
      model=model, params=params,
      kind='registry' if entry is not None else 'official',
      source=read.source, image_size=size, eval_crop='resize_crop',
      eval_resize=int(round(size * _IMAGENET_RESIZE_RATIO)),
      dataset=entry.dataset if entry is not None else None, entry=entry)
