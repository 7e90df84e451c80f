"""The published MLP-Mixer checkpoints and the local cache that holds them.

A registry name is a file's path in the public bucket `gs://mixer_models/`
without `.npz`, e.g. `imagenet21k/Mixer-L_16`. Files are copied once, with
`tf.io.gfile` (network access to Google Cloud Storage), into
`$MIXER_JAX_CACHE` or `~/.cache/mixer_jax` in the bucket's layout; without
network, `resolve` says where to put a file downloaded elsewhere.
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
  """One published checkpoint: its registry name, the variant ("B_16") and
  head size it holds, the side of its training images, what the head
  predicts ('imagenet2012' or 'imagenet21k'), one line on its training, and
  where the file lives (`gs://` or a local path)."""
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
    return self.url.replace(BUCKET, HTTPS_BUCKET, 1)


def _entry(name, description):
  in21k = name.startswith('imagenet21k/')
  return Checkpoint(name=name, variant=name.split('/')[-1][len('Mixer-'):],
                    num_classes=21843 if in21k else 1000, image_size=224,
                    dataset='imagenet21k' if in21k else 'imagenet2012',
                    description=description, url=f'{BUCKET}/{name}.npz')


# All files of gs://mixer_models (paper, Section 3 and the SAM/GSAM follow-ups
# that published Mixer weights into the same bucket).
CHECKPOINTS = {c.name: c for c in [
    _entry('imagenet1k/Mixer-B_16',
           'ImageNet-1k from scratch (paper, 76.44% top-1).'),
    _entry('imagenet1k/Mixer-L_16', 'ImageNet-1k from scratch.'),
    *(_entry(f'imagenet21k/Mixer-{v}',
             'ImageNet-21k pretraining; fine-tune for a 1k head.')
      for v in ('B_16', 'L_16')),
    *(_entry(f'sam/Mixer-{v}', 'ImageNet-1k with the SAM optimizer.')
      for v in ('B_16', 'B_32')),
    *(_entry(f'gsam/Mixer-{v}', 'ImageNet-1k with the GSAM optimizer.')
      for v in ('B_16', 'B_32', 'S_16', 'S_32', 'S_8')),
]}


def list_checkpoints() -> Tuple[str, ...]:
  """Names of all registered checkpoints, sorted."""
  return tuple(sorted(CHECKPOINTS))


def get(name: str) -> Checkpoint:
  """The entry `name` (".npz" suffix and "gs://" accepted), or a KeyError
  listing the known names."""
  key = name.removeprefix(BUCKET + '/').removesuffix('.npz')
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


def _first_line(error) -> str:
  return f'{type(error).__name__}: ' + (str(error).strip() or
                                        repr(error)).splitlines()[0]


def fetch(checkpoint: Checkpoint) -> str:
  """The cached file of `checkpoint`, copied there first if needed.

  The copy goes to a temporary name, renamed when complete, so an
  interrupted download never leaves a truncated file under the final name.

  Raises:
    CheckpointNotFoundError: not cached and not copied (e.g. no network);
      the message says where to put it by hand.
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
    raise CheckpointNotFoundError(
        f'Checkpoint {checkpoint.name!r} is not in the cache and could not be '
        f'downloaded from {checkpoint.url} ({_first_line(e)}).\n'
        f'Without network access here, download it on a machine that has '
        f'it, e.g.\n  gsutil cp {checkpoint.url} .\n  or  wget '
        f'{checkpoint.https_url}\nand copy the file to\n  {target}\n'
        f'(the cache directory is ${CACHE_ENV} or ~/.cache/mixer_jax), or '
        f'pass the file\'s path instead of the name.') from e
  return target


def resolve(name_or_path: str) -> Tuple[str, Optional[Checkpoint]]:
  """(a readable path, the registry entry or None) of a registry name, a
  `gs://` URL of a registered file, or any local or `gs://` file path.

  Raises:
    CheckpointNotFoundError: neither an existing file nor a known name.
  """
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
        f'{name_or_path} cannot be read ({_first_line(e)}).') from e
  if not exists:
    raise CheckpointNotFoundError(
        f'{name_or_path!r} is neither an existing file nor a published '
        f'checkpoint name. Known names: {", ".join(list_checkpoints())}.')
  if tf.io.gfile.isdir(name_or_path):
    raise CheckpointNotFoundError(
        f'{name_or_path} is a directory; expected an official-format .npz '
        f'file. (To resume a mixer_jax training run, use its workdir with '
        f'mixer_jax.train instead.)')
  return name_or_path, None
