"""The published MLP-Mixer checkpoints and the local cache that holds them.

Every checkpoint the paper's authors released lives in the public bucket
`gs://mixer_models/` (also served over HTTPS from
`https://storage.googleapis.com/mixer_models/`). A registry name is the
file's path in that bucket without `.npz`, e.g. `imagenet21k/Mixer-L_16`.

Files are copied once into a cache directory, `$MIXER_JAX_CACHE` when set and
`~/.cache/mixer_jax` otherwise, keeping the bucket's layout:
`<cache>/imagenet1k/Mixer-B_16.npz`. Copying uses `tf.io.gfile`, so it needs
network access to Google Cloud Storage; without it, `resolve` raises an error
that says where to put a file downloaded elsewhere.
"""

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
  """One published checkpoint.

  Attributes:
    name: registry name, the bucket path without `.npz`.
    variant: model variant as `models.get_spec` spells it, e.g. "B_16".
    num_classes: size of the stored head.
    image_size: side of the square images it was trained on.
    dataset: what the head predicts: 'imagenet2012' (the 1,000 ImageNet-1k
      classes, in the standard order) or 'imagenet21k' (21,843 classes).
    description: one line on how it was trained.
    url: where the file lives; `gs://` or a local path.
  """
  name: str
  variant: str
  num_classes: int
  image_size: int
  dataset: str
  description: str
  url: str

  @property
  def https_url(self) -> str:
    """The same file over HTTPS, for browsers, curl or wget."""
    if self.url.startswith(BUCKET + '/'):
      return HTTPS_BUCKET + self.url[len(BUCKET):]
    return self.url


def _entry(name, num_classes, dataset, description):
  variant = name.split('/')[-1].replace('Mixer-', '')
  return Checkpoint(name=name, variant=variant, num_classes=num_classes,
                    image_size=224, dataset=dataset, description=description,
                    url=f'{BUCKET}/{name}.npz')


# All files of gs://mixer_models (paper, Section 3 and the SAM/GSAM follow-ups
# that published Mixer weights into the same bucket).
CHECKPOINTS = {c.name: c for c in [
    _entry('imagenet1k/Mixer-B_16', 1000, 'imagenet2012',
           'ImageNet-1k from scratch (paper, 76.44% top-1).'),
    _entry('imagenet1k/Mixer-L_16', 1000, 'imagenet2012',
           'ImageNet-1k from scratch.'),
    _entry('imagenet21k/Mixer-B_16', 21843, 'imagenet21k',
           'ImageNet-21k pretraining; fine-tune for a 1k head.'),
    _entry('imagenet21k/Mixer-L_16', 21843, 'imagenet21k',
           'ImageNet-21k pretraining; fine-tune for a 1k head.'),
    _entry('sam/Mixer-B_16', 1000, 'imagenet2012',
           'ImageNet-1k with the SAM optimizer.'),
    _entry('sam/Mixer-B_32', 1000, 'imagenet2012',
           'ImageNet-1k with the SAM optimizer.'),
    _entry('gsam/Mixer-B_16', 1000, 'imagenet2012',
           'ImageNet-1k with the GSAM optimizer.'),
    _entry('gsam/Mixer-B_32', 1000, 'imagenet2012',
           'ImageNet-1k with the GSAM optimizer.'),
    _entry('gsam/Mixer-S_16', 1000, 'imagenet2012',
           'ImageNet-1k with the GSAM optimizer.'),
    _entry('gsam/Mixer-S_32', 1000, 'imagenet2012',
           'ImageNet-1k with the GSAM optimizer.'),
    _entry('gsam/Mixer-S_8', 1000, 'imagenet2012',
           'ImageNet-1k with the GSAM optimizer.'),
]}


def list_checkpoints() -> Tuple[str, ...]:
  """Names of all registered checkpoints, sorted."""
  return tuple(sorted(CHECKPOINTS))


def get(name: str) -> Checkpoint:
  """Returns the registry entry `name` (".npz" suffix and "gs://" accepted).

  Raises:
    KeyError: with the list of known names when `name` is not registered.
  """
  key = name
  if key.startswith(BUCKET + '/'):
    key = key[len(BUCKET) + 1:]
  if key.endswith('.npz'):
    key = key[:-len('.npz')]
  if key not in CHECKPOINTS:
    raise KeyError(f'No published Mixer checkpoint is called {name!r}. Known '
                   f'names: {", ".join(list_checkpoints())}.')
  return CHECKPOINTS[key]


def cache_dir() -> str:
  """The local cache directory ($MIXER_JAX_CACHE or ~/.cache/mixer_jax)."""
  return os.environ.get(CACHE_ENV) or os.path.join(
      os.path.expanduser('~'), '.cache', 'mixer_jax')


def local_path(checkpoint: Checkpoint) -> str:
  """Where `checkpoint` is (or will be) kept in the cache."""
  return os.path.join(cache_dir(), *checkpoint.name.split('/')) + '.npz'


def fetch(checkpoint: Checkpoint) -> str:
  """Returns the cached file of `checkpoint`, copying it there if needed.

  The copy goes to a temporary name first and is renamed when complete, so an
  interrupted download never leaves a truncated file under the final name.

  Raises:
    CheckpointNotFoundError: the file is not cached and could not be copied
      (e.g. no network); the message says where to put it by hand.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  target = local_path(checkpoint)
  if tf.io.gfile.exists(target):
    return target
  os.makedirs(os.path.dirname(target), exist_ok=True)
  partial = f'{target}.partial-{uuid.uuid4().hex}'
  try:
    tf.io.gfile.copy(checkpoint.url, partial, overwrite=True)
    os.replace(partial, target)
  except (tf.errors.OpError, OSError) as e:
    if os.path.exists(partial):
      os.remove(partial)
    reason = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    raise CheckpointNotFoundError(
        f'Checkpoint {checkpoint.name!r} is not in the cache and could not be '
        f'downloaded from {checkpoint.url} ({type(e).__name__}: {reason}).\n'
        f'Without network access here, download it on a machine that has '
        f'it, e.g.\n  gsutil cp {checkpoint.url} .\n  or  wget '
        f'{checkpoint.https_url}\nand copy the file to\n  {target}\n'
        f'(the cache directory is ${CACHE_ENV} or ~/.cache/mixer_jax), or '
        f'pass the file\'s path instead of the name.') from e
  return target


def resolve(name_or_path: str) -> Tuple[str, Optional[Checkpoint]]:
  """Turns a registry name or a file path into a readable path.

  Args:
    name_or_path: a registry name ("imagenet1k/Mixer-B_16"), a `gs://` URL of
      a registered file, or any local or `gs://` path to an official-format
      `.npz` file.

  Returns:
    (path, entry): the path to read and the registry entry, or None for a
    path that is not a registered checkpoint.

  Raises:
    CheckpointNotFoundError: neither an existing file nor a known name.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  if not isinstance(name_or_path, (str, os.PathLike)):
    raise TypeError(f'Expected a checkpoint name or path, got '
                    f'{type(name_or_path).__name__}.')
  name_or_path = os.fspath(name_or_path)
  try:
    entry = get(name_or_path)
  except KeyError:
    entry = None
  if entry is not None:
    return fetch(entry), entry
  try:
    exists = tf.io.gfile.exists(name_or_path)
  except tf.errors.OpError as e:  # gs:// without network or permission.
    raise CheckpointNotFoundError(
        f'{name_or_path} cannot be read ({type(e).__name__}: '
        f'{str(e).strip().splitlines()[0]}).') from e
  if exists:
    if tf.io.gfile.isdir(name_or_path):
      raise CheckpointNotFoundError(
          f'{name_or_path} is a directory; expected an official-format .npz '
          f'file. (To resume a mixer_jax training run, use its workdir with '
          f'mixer_jax.train instead.)')
    return name_or_path, None
  raise CheckpointNotFoundError(
      f'{name_or_path!r} is neither an existing file nor a published '
      f'checkpoint name. Known names: {", ".join(list_checkpoints())}.')
