"""`Loaded`: a checkpoint of any kind, ready to use (`any_checkpoint.load`)."""

import dataclasses
import os
from typing import Any, List, Optional

from mixer_jax import models
from mixer_jax.weights import hub
from mixer_jax.weights import official_format
from mixer_jax.weights import registry


def portable_name(spec) -> str:
  """A Hub name, URL or registry name as is; a local path by its last part.

  What exported files may say of where they came from: a local path would
  tell where the exporter kept its files and mean nothing elsewhere.
  """
  spec = str(spec)
  if hub.is_hub_name(spec) or '://' in spec or not (
      os.path.isabs(spec) or os.path.exists(spec)):
    return spec
  return os.path.basename(os.path.normpath(spec))


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
    eval_crop, eval_resize: the evaluation preprocessing that goes with the
      weights (`preprocess.eval_image`'s crop, and the side it resizes to).
    class_names: names of the head's classes when the checkpoint knows them.
    dataset: what the head predicts, when known ('imagenet2012',
      'imagenet21k', or the workdir's config.dataset).
    step, config: a workdir's Orbax step and run config.
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
  def portable_source(self) -> str:
    """`source` as exported files name it (see `portable_name`)."""
    if self.entry is not None:
      return self.entry.name
    if self.kind == 'workdir':  # 'WORKDIR step N': the workdir's own name.
      return os.path.basename(self.source)
    return portable_name(self.source)

  @property
  def num_classes(self) -> int:
    return int(self.model.num_classes or 0)

  def features(self):
    """(model, params) giving the pooled features without the head (what a
    linear probe needs)."""
    params = {k: v for k, v in official_format.unwrap(self.params).items()
              if k != 'head'}
    return self.model.clone(num_classes=None), params
