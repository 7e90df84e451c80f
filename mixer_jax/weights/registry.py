"""The published MLP-Mixer checkpoints (a name is a file's path in
`gs://mixer_models/` without `.npz`) and the local cache that holds them."""

import dataclasses
import os
from typing import Optional, Tuple
import uuid

from mixer_jax.errors import UserError

BUCKET = 'gs://mixer_models'
HTTPS_BUCKET = 'https://storage.googleapis.com/mixer_models'
CACHE_ENV = 'MIXER_JAX_CACHE'


class CheckpointNotFoundError(UserError, FileNotFoundError):
  """A registry name or path that cannot be turned into a readable file."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """One published checkpoint; its name says the variant and the classes."""
  name: str  # E.g. 'imagenet21k/Mixer-L_16'.
  url: str

  @property
  def variant(self) -> str:
    return self.name.split('/Mixer-')[-1]

  @property
  def dataset(self) -> str:
    in21k = self.name.startswith('imagenet21k/')
    return 'imagenet21k' if in21k else 'imagenet2012'

  @property
  def num_classes(self) -> int:
    return 21843 if self.dataset == 'imagenet21k' else 1000

  @property
  def https_url(self) -> str:
    """The same file over HTTPS, for browsers, curl or wget."""
    return self.url.replace(BUCKET, HTTPS_BUCKET, 1)


# All files of gs://mixer_models: the paper's (ImageNet-1k from scratch,
# ImageNet-21k pretraining) and the SAM/GSAM optimizer follow-ups'.
CHECKPOINTS = {name: Checkpoint(name, f'{BUCKET}/{name}.npz') for name in (
    'imagenet1k/Mixer-B_16', 'imagenet1k/Mixer-L_16',
    'imagenet21k/Mixer-B_16', 'imagenet21k/Mixer-L_16',
    'sam/Mixer-B_16', 'sam/Mixer-B_32', 'gsam/Mixer-B_16', 'gsam/Mixer-B_32',
    'gsam/Mixer-S_16', 'gsam/Mixer-S_32', 'gsam/Mixer-S_8')}


def get(name: str) -> Checkpoint:
  """The entry `name` (".npz" suffix and "gs://" accepted), or a KeyError."""
  key = name.removeprefix(BUCKET + '/').removesuffix('.npz')
  if key not in CHECKPOINTS:
    raise KeyError(f'No published Mixer checkpoint is called {name!r}. Known '
                   f'names: {", ".join(sorted(CHECKPOINTS))}.')
  return CHECKPOINTS[key]


def local_path(checkpoint: Checkpoint) -> str:
  cache = os.environ.get(CACHE_ENV) or os.path.expanduser('~/.cache/mixer_jax')
  return os.path.join(cache, *checkpoint.name.split('/')) + '.npz'


def first_line(error) -> str:
  """'Type: first line of the message' of an error, for one-line errors."""
  return f'{type(error).__name__}: ' + (str(error).strip() or
                                        repr(error)).splitlines()[0]


def fetch(checkpoint: Checkpoint) -> str:
  """The cached file of `checkpoint`, copied there first if needed (to a
  temporary name, renamed when complete: never a truncated file)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  target = local_path(checkpoint)
  if os.path.exists(target):
    return target
  os.makedirs(os.path.dirname(target), exist_ok=True)
  partial = f'{target}.partial-{uuid.uuid4().hex}'
  try:
    tf.io.gfile.copy(checkpoint.url, partial, overwrite=True)
    os.replace(partial, target)
  except (tf.errors.OpError, OSError) as e:
    if os.path.exists(partial):
      os.remove(partial)
    raise CheckpointNotFoundError(
        f'Checkpoint {checkpoint.name!r} is not in the cache and could not be '
        f'downloaded from {checkpoint.url} ({first_line(e)}). Without '
        f'network access, run `gsutil cp {checkpoint.url} .` (or `wget '
        f'{checkpoint.https_url}`) elsewhere and copy the file to {target} '
        f'(the cache is ${CACHE_ENV} or ~/.cache/mixer_jax), or pass its '
        'path instead of the name.') from e
  return target


def resolve(name_or_path: str) -> Tuple[str, Optional[Checkpoint]]:
  """(a readable path, the registry entry or None) of a registry name, a
  `gs://` URL of a registered file, or any local or `gs://` file path."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  name_or_path = os.fspath(name_or_path)
  try:
    entry = get(name_or_path)
    return fetch(entry), entry
  except KeyError:
    pass
  try:
    exists = tf.io.gfile.exists(name_or_path)
  except tf.errors.OpError as e:  # gs:// without network or permission.
    raise CheckpointNotFoundError(
        f'{name_or_path} cannot be read ({first_line(e)}).') from e
  if not exists:
    raise CheckpointNotFoundError(
        f'{name_or_path!r} is neither an existing file nor a published '
        f'checkpoint name. Known names: {", ".join(sorted(CHECKPOINTS))}.')
  if tf.io.gfile.isdir(name_or_path):
    raise CheckpointNotFoundError(
        f'{name_or_path} is a directory; expected an official-format .npz '
        'file.')
  return name_or_path, None
