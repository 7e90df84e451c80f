"""`Loaded`: a checkpoint of any kind, ready to use (`any_checkpoint.load`)."""

import dataclasses
import os
from typing import Any, List, Optional

from mixer_jax import models
from mixer_jax.weights import hub
from mixer_jax.weights import official_format
from mixer_jax.weights import registry


def portable_name(spec) -> str:
  """A Hub name, URL or registry name as is; a local path by its last part
  (exported files must not tell where the exporter kept its files)."""
  spec = str(spec)
  if hub.is_hub_name(spec) or '://' in spec or not (
      os.path.isabs(spec) or os.path.exists(spec)):
    return spec
  return os.path.basename(os.path.normpath(spec))


@dataclasses.dataclass
class Loaded:
  """A checkpoint ready to use: `model.apply({'params': params}, images)`,
  images in [-1, 1], preprocessed with `eval_crop` and `eval_resize`
  (`preprocess.eval_image`'s crop and the side it resizes to)."""
  model: models.MlpMixer
  params: Any  # NumPy or JAX arrays.
  kind: str  # 'workdir', 'registry', 'hub', 'timm' or 'official'.
  source: str  # What was loaded, for messages (path or name, and step).
  image_size: int  # The side the weights were trained or evaluated at.
  eval_crop: str
  eval_resize: int
  class_names: Optional[List[str]] = None  # When the checkpoint knows them.
  dataset: Optional[str] = None  # What the head predicts, when known.
  step: Optional[int] = None  # A workdir's Orbax step,
  config: Any = None  # and its run config.
  entry: Optional[registry.Checkpoint] = None  # Of a registry name.

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
    """(model, params) giving the pooled features without the head."""
    params = {k: v for k, v in official_format.unwrap(self.params).items()
              if k != 'head'}
    return self.model.clone(num_classes=None), params
