"""The official MLP-Mixer checkpoint format: reading and inspecting it.

An `.npz` of float32 arrays keyed by the parameter paths (docs/weights.md),
read without pickles through `tf.io.gfile` (so `gs://` works).
"""

import collections
import dataclasses
import math
import os
import re
from typing import Any, Dict, Mapping, Optional, Union
import zipfile
import zlib

import numpy as np

from mixer_jax import models
from mixer_jax.errors import UserError
from mixer_jax.weights import registry

BLOCK_RE = re.compile(r'^MixerBlock_(\d+)/')


class PretrainedError(UserError, ValueError):
  """A checkpoint that cannot be read, or does not fit the model."""


@dataclasses.dataclass
class WeightFile:
  """A weight file read into the official flat tree, taking [-1, 1] inputs."""
  flat: Dict[str, np.ndarray]  # {'stem/kernel': array, ...}
  source: str  # What messages call it: a path or a name.
  kind: str  # 'official', 'registry', 'hub', 'timm' or 'workdir'.
  gelu_approximate: bool = True  # The form the weights were trained with.
  entry: Optional[registry.Checkpoint] = None  # Of a registry name.
  timm: Any = None  # A timm-format file's `hub.TimmInfo` (its config.json).


def unwrap(params):
  """Accepts `{'params': tree}` (a Flax variables dict) or the tree itself."""
  if isinstance(params, Mapping) and set(params) == {'params'}:
    params = params['params']
  if not isinstance(params, Mapping):
    raise TypeError(f'Expected a parameter dict, got {type(params).__name__}.')
  return params


_IMAGE_ADVICE = ('images are classified with `python -m mixer_jax.predict '
                 '--checkpoint=WEIGHTS IMAGE`')
# What a file is, read from its first bytes (suffixes are often wrong):
# kind -> (its first bytes, what it is, what to pass instead).
_KINDS = {
    'npz': ((b'PK\x03\x04',), 'an .npz archive', ''),
    # What np.savez() of nothing writes.
    'empty_npz': ((b'PK\x05\x06',), 'an empty .npz archive: it holds no '
                  'arrays', ''),
    'npy': ((b'\x93NUMPY',), 'a single .npy array, not an .npz archive of '
            'named parameters', 'save the parameters with '
            'pretrained.export_official'),
    'png': ((b'\x89PNG\r\n\x1a\n',), 'a PNG image', _IMAGE_ADVICE),
    'jpeg': ((b'\xff\xd8\xff',), 'a JPEG image', _IMAGE_ADVICE),
    'gif': ((b'GIF87a', b'GIF89a'), 'a GIF image', _IMAGE_ADVICE),
    'json': ((b'{', b'['), 'a JSON text file', 'pass the weights '
             '(model.safetensors) or the folder that holds both'),
    # Recognised otherwise (see file_kind):
    'safetensors': ((), 'a safetensors file', ''),
    'pickle': ((), 'pickled Python data', 'pickled files are refused: '
               'loading them could run code; pass an .npz or .safetensors '
               'file'),
    'jax_export': ((), 'a jax.export (StableHLO) model for serving, as '
                   '`mixer_jax.export --format=stablehlo` writes it',
                   'load it with jax.export.deserialize; here pass the '
                   'checkpoint it was exported from'),
}


def file_kind(path: Union[str, os.PathLike]) -> Optional[str]:
  """The kind of a file (a key of `_KINDS`) by its content, or None.

  A safetensors file starts with its header's length (8 bytes, little
  endian) and '{'; a `jax.export` file has no magic bytes: deserialized last.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  with tf.io.gfile.GFile(os.fspath(path), 'rb') as f:
    head = f.read(16)
    size = f.size()
  for kind, (starts, _, _) in _KINDS.items():
    if starts and head.startswith(starts):
      return kind
  if (len(head) > 8 and head[8:9] == b'{' and
      int.from_bytes(head[:8], 'little') <= size - 8):
    return 'safetensors'
  if head[:1] == b'\x80' and head[1:2] in (b'\x02', b'\x03', b'\x04', b'\x05'):
    return 'pickle'
  try:
    import jax  # pylint: disable=g-import-not-at-top
    with tf.io.gfile.GFile(os.fspath(path), 'rb') as f:
      jax.export.deserialize(bytearray(f.read()))
    return 'jax_export'
  except Exception:  # pylint: disable=broad-except
    return None  # Any parse failure: not a jax.export file.


def load_npz(path: Union[str, os.PathLike]) -> Dict[str, np.ndarray]:
  """An official `.npz` as a flat dict; only finite float arrays pass."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  if not tf.io.gfile.exists(path):
    raise registry.CheckpointNotFoundError(f'No checkpoint file at {path}.')
  kind = file_kind(path)
  if kind is None:
    raise PretrainedError(
        f'{path} is neither an .npz archive nor a safetensors file (its first '
        'bytes are neither). Official checkpoints are .npz files of float32 '
        'arrays, timm-format ones .safetensors.')
  if kind != 'npz':
    _, what, advice = _KINDS[kind]
    raise PretrainedError(f'{path} is {what}' + (
        f', not a weight file; {advice}.' if advice else '.'))
  flat, key = {}, None
  try:
    with tf.io.gfile.GFile(path, 'rb') as f, np.load(
        f, allow_pickle=False) as archive:
      for key in archive.files:
        flat[key] = archive[key]
  except (ValueError, zipfile.BadZipFile, EOFError, OSError, zlib.error,
          tf.errors.OpError) as e:
    if 'pickle' in str(e).lower():
      raise PretrainedError(
          f'{path}: entry {key!r} is a pickled object array, refused: '
          'loading pickles could run code.') from e
    raise PretrainedError(f'{path} is truncated or corrupt ({type(e).__name__}'
                          f': {e}); download it again.') from e
  for key, value in flat.items():
    if not np.issubdtype(value.dtype, np.floating):
      raise PretrainedError(
          f'{path}: entry {key!r} has dtype {value.dtype}; official '
          f'checkpoints hold float arrays only.')
  check_finite(flat, path)
  return flat


def check_finite(flat: Mapping[str, Any], source) -> None:
  """Refuses NaN or infinite weights, naming the leaves that hold them."""
  bad = [f'{key} ({np.size(v) - np.isfinite(v).sum()} of {np.size(v)} '
         'values)' for key, v in flat.items()
         if np.issubdtype(np.asarray(v).dtype, np.inexact) and
         not np.isfinite(v).all()]
  if bad:
    more = f' and {len(bad) - 8} more' if len(bad) > 8 else ''
    raise PretrainedError(
        f'{source} holds NaN or infinite weights in {", ".join(bad[:8])}'
        f'{more}; the file is damaged or came from a diverged run, and is '
        'refused.')


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
  """The architecture a checkpoint's shapes imply (None where unknown)."""
  patch_size: Optional[int]
  num_blocks: int
  hidden_dim: Optional[int]
  tokens_mlp_dim: Optional[int]
  channels_mlp_dim: Optional[int]
  num_tokens: Optional[int]
  num_classes: int  # 0 when the file has no head.

  @property
  def image_size(self) -> Optional[int]:
    """Side of the square training images, if the token grid is square."""
    if not self.num_tokens or not self.patch_size:
      return None
    side = math.isqrt(self.num_tokens)
    return side * self.patch_size if side * side == self.num_tokens else None

  @property
  def variant(self) -> Optional[str]:
    """Paper variant name ("B_16") whose sizes all match, else None."""
    sizes = dict(num_blocks=self.num_blocks, hidden_dim=self.hidden_dim,
                 tokens_mlp_dim=self.tokens_mlp_dim,
                 channels_mlp_dim=self.channels_mlp_dim)
    for family, family_sizes in models.FAMILIES.items():
      if family_sizes == sizes and self.patch_size:
        return f'{family}_{self.patch_size}'
    return None

  def describe(self) -> str:
    """One line such as 'Mixer-B_16 at 224x224 with 1000 classes (...)'."""
    name = f'Mixer-{self.variant}' if self.variant else 'a custom Mixer'
    size = (f' at {self.image_size}x{self.image_size}' if self.image_size
            else '')
    head = (f'{self.num_classes} classes' if self.num_classes
            else 'no head')
    return (f'{name}{size} with {head} (patch {self.patch_size}, '
            f'{self.num_blocks} blocks, C={self.hidden_dim}, '
            f'D_S={self.tokens_mlp_dim}, D_C={self.channels_mlp_dim}, '
            f'{self.num_tokens} tokens)')


def infer_architecture(flat: Mapping[str, Any]) -> CheckpointInfo:
  """The architecture of a flat checkpoint's shapes, per-block sizes by
  majority so that one damaged leaf does not hide what the file is."""
  def common(pattern, axis):
    counts = collections.Counter(
        tuple(v.shape)[axis] for k, v in flat.items()
        if re.fullmatch(pattern, k) and len(v.shape) == 2)
    return int(counts.most_common(1)[0][0]) if counts else None

  stem = flat.get('stem/kernel')
  blocks = {int(m.group(1)) for m in map(BLOCK_RE.match, flat) if m}
  head = flat.get('head/kernel')
  hidden = common(r'MixerBlock_\d+/channel_mixing/Dense_0/kernel', 0)
  if hidden is None and stem is not None and len(stem.shape) == 4:
    hidden = int(stem.shape[-1])
  return CheckpointInfo(
      patch_size=(int(stem.shape[0]) if stem is not None
                  and len(stem.shape) == 4 else None),
      num_blocks=max(blocks) + 1 if blocks else 0,
      hidden_dim=hidden,
      tokens_mlp_dim=common(r'MixerBlock_\d+/token_mixing/Dense_0/kernel', 1),
      channels_mlp_dim=common(
          r'MixerBlock_\d+/channel_mixing/Dense_0/kernel', 1),
      num_tokens=common(r'MixerBlock_\d+/token_mixing/Dense_0/kernel', 0),
      num_classes=(int(head.shape[-1]) if head is not None
                   and len(head.shape) == 2 else 0))


def mismatch_error(source, flat, missing, extra, wrong, hint=''):
  """A PretrainedError listing every mismatched leaf and what the file is."""
  count = len(missing) + len(extra) + len(wrong)
  lines = [f'Checkpoint {source} does not fit the model: {count} mismatched '
           f'leaves.' if count else f'Checkpoint {source} is not a complete '
           f'Mixer parameter tree.']
  lines += [f'  missing from the file: {k} (model expects {s})'
            for k, s in missing]
  lines += [f'  extra in the file: {k} {s}' for k, s in extra]
  lines += [f'  wrong shape: {k}: file {f}, model {m}' for k, f, m in wrong]
  lines.append(f'The file looks like {infer_architecture(flat).describe()}.')
  if hint:
    lines.append(hint)
  return PretrainedError('\n'.join(lines))
