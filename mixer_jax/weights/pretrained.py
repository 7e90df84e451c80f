"""Weight files to models and back: read, check, adapt, write.

Every leaf is checked; the resolution change (paper, Appendix C) is
described in docs/weights.md.
"""

import dataclasses
import io
import math
import os
from typing import Any, Dict, Mapping, Optional, Union

from flax import traverse_util
import numpy as np

from mixer_jax import models
from mixer_jax.weights import hub
from mixer_jax.weights import registry
from mixer_jax.weights.official_format import BLOCK_RE
from mixer_jax.weights.official_format import CheckpointInfo
from mixer_jax.weights.official_format import file_kind
from mixer_jax.weights.official_format import infer_architecture
from mixer_jax.weights.official_format import load_npz
from mixer_jax.weights.official_format import mismatch_error
from mixer_jax.weights.official_format import PretrainedError
from mixer_jax.weights.official_format import unwrap
from mixer_jax.weights.official_format import WeightFile

_TOKEN_KEY = 'MixerBlock_0/token_mixing/Dense_0/kernel'


def read_weights(name_or_path) -> WeightFile:
  """Any checkpoint kind docs/weights.md lists (a workdir: its newest step)
  as the official flat tree."""
  # pylint: disable-next=g-import-not-at-top
  from mixer_jax.weights import workdir_checkpoint  # Imports Orbax.
  if isinstance(name_or_path, WeightFile):
    return name_or_path
  if workdir_checkpoint.is_directory(name_or_path):
    loaded = workdir_checkpoint.load(os.fspath(name_or_path), None, None, {},
                                     'params')
    flat = traverse_util.flatten_dict(loaded.params, sep='/')
    return WeightFile({k: np.asarray(v) for k, v in flat.items()},
                      loaded.source, 'workdir',
                      gelu_approximate=loaded.model.gelu_approximate)
  if hub.is_hub_name(name_or_path):
    return hub.load(name_or_path)
  if hub.is_folder(name_or_path):  # E.g. what `export --format=hub` writes.
    path, entry = os.path.join(os.fspath(name_or_path), hub.WEIGHTS_FILE), None
  else:
    path, entry = registry.resolve(name_or_path)
  # By content, not suffix: a safetensors file named .npz loads all the same.
  if file_kind(path) == 'safetensors':
    return hub.load_safetensors(path, config=hub.sidecar_config(path))
  return WeightFile(load_npz(path), path,
                    'official' if entry is None else 'registry', entry=entry)


def checkpoint_info(name_or_path: str) -> CheckpointInfo:
  """The architecture of a registry name, Hub name or file (reads it)."""
  return infer_architecture(read_weights(name_or_path).flat)


def resolution_factor(checkpoint_tokens: int, target_tokens: int,
                      patch_size: Optional[int] = None) -> int:
  """The integer growth factor K of the image side, or an explaining error."""
  n0, n = math.isqrt(checkpoint_tokens), math.isqrt(target_tokens)
  if n0 * n0 != checkpoint_tokens or n * n != target_tokens:
    raise PretrainedError(
        f'Cannot map {checkpoint_tokens} checkpoint tokens onto '
        f'{target_tokens}: the resolution change needs square patch grids.')
  if n % n0 == 0:
    return n // n0
  side = f'{n0 * patch_size}' if patch_size else f'{n0} patches'
  raise PretrainedError(
      f'The model has a {n}x{n} patch grid but the checkpoint was trained on '
      f'{n0}x{n0}; the ratio {n / n0:.3g} is not an integer. Token-mixing '
      'weights are tied to positions, and the paper (Appendix C) only grows '
      'the side by an integer factor; other ratios (e.g. 224 -> 384) and '
      f'smaller images are not supported: use a multiple of {side}.')


def _tile_major_positions(grid: int, factor: int) -> np.ndarray:
  """Each row-major token's index in tile-major order (K x K tiles row by
  row, row-major inside), the order of the block-diagonal matrices."""
  side = grid * factor
  row, col = np.divmod(np.arange(side * side), side)
  tile = (row // grid) * factor + col // grid
  return tile * grid * grid + (row % grid) * grid + col % grid


def _expand_flat(flat: Mapping[str, Any], factor: int) -> Dict[str, Any]:
  """Appendix C expansion of every block's token-mixing MLP by `factor`."""
  out = dict(flat)
  copies = factor * factor
  blocks = sorted({int(m.group(1)) for m in map(BLOCK_RE.match, flat) if m})
  for i in blocks:
    base = f'MixerBlock_{i}/token_mixing/'
    keys = [base + n for n in ('Dense_0/kernel', 'Dense_0/bias',
                               'Dense_1/kernel', 'Dense_1/bias')]
    if not all(k in flat for k in keys):
      continue  # Reported as missing by the leaf check.
    w1, b1, w2, b2 = (np.asarray(flat[k]) for k in keys)
    if (w1.ndim != 2 or w2.shape != w1.shape[::-1]
        or b1.shape != w1.shape[1:] or b2.shape != w1.shape[:1]):
      continue  # Inconsistent block: the leaf check reports its shapes.
    grid = math.isqrt(w1.shape[0])
    order = _tile_major_positions(grid, factor)
    eye = np.eye(copies, dtype=w1.dtype)
    # kron(I, W) is block-diagonal in tile-major token order; indexing the
    # token axis with `order` puts rows/columns in the model's row-major order.
    out[keys[0]] = np.kron(eye, w1)[order, :]
    out[keys[1]] = np.tile(b1, copies)
    out[keys[2]] = np.kron(eye, w2)[:, order]
    out[keys[3]] = np.tile(b2, copies)[order]
  return out


def expand_token_mixing(params: Mapping[str, Any], factor: int):
  """Appendix C: `params` for images `factor` (K) times larger, a NumPy
  tree for `create_model(..., tokens_mlp_dim=K**2 * D_S)`."""
  if not isinstance(factor, (int, np.integer)) or factor < 1:
    raise PretrainedError(
        f'factor={factor!r}: Appendix C needs a positive integer factor of '
        f'the image side.')
  flat = traverse_util.flatten_dict(unwrap(params), sep='/')
  return traverse_util.unflatten_dict(_expand_flat(flat, int(factor)),
                                      sep='/')


def _restore(flat, target, source, fresh_head):
  """Fills the (abstract or concrete) `target` tree from `flat`."""
  target_flat = traverse_util.flatten_dict(unwrap(target), sep='/')
  original = flat
  patch = infer_architecture(flat).patch_size
  hint = ''
  if _TOKEN_KEY in flat and _TOKEN_KEY in target_flat:
    factor = resolution_factor(flat[_TOKEN_KEY].shape[0],
                               target_flat[_TOKEN_KEY].shape[0], patch)
    if factor > 1:
      hint = (f'Resolution change by K={factor} (shapes above are after '
              'the expansion): the token-mixing hidden width must become '
              f'K^2 * D_S = {factor**2 * flat[_TOKEN_KEY].shape[1]}; set '
              'tokens_mlp_dim (config.model.tokens_mlp_dim) to it.')
      flat = _expand_flat(flat, factor)
  ckpt_head = flat.get('head/kernel')
  target_head = target_flat.get('head/kernel')
  replace_head = (target_head is not None and (
      ckpt_head is None or ckpt_head.shape[-1:] != target_head.shape[-1:]))
  out, missing, wrong = {}, [], []
  for key, leaf in target_flat.items():
    if replace_head and key.startswith('head/'):
      out[key] = np.asarray(fresh_head[key], dtype=leaf.dtype)
    elif key not in flat:
      missing.append((key, tuple(leaf.shape)))
    elif tuple(flat[key].shape) != tuple(leaf.shape):
      wrong.append((key, tuple(flat[key].shape), tuple(leaf.shape)))
    else:
      out[key] = np.asarray(flat[key], dtype=leaf.dtype)
  extra = [(k, tuple(v.shape)) for k, v in flat.items()
           if k not in target_flat and not
           (k.startswith('head/') and target_head is None)]
  if missing or extra or wrong:
    token_problem = any('token_mixing' in w[0] for w in wrong)
    raise mismatch_error(source, original, missing, extra, wrong,
                         hint if token_problem else '')
  return traverse_util.unflatten_dict(out, sep='/')


def init_from_checkpoint(name_or_path, params):
  """Fresh `params` filled from what `read_weights` reads, in their dtypes;
  their head is kept when the class counts differ."""
  read = read_weights(name_or_path)
  fresh = traverse_util.flatten_dict(unwrap(params), sep='/')
  return _restore(read.flat, params, read.source, fresh)


def _architecture(flat, source) -> CheckpointInfo:
  """What a flat tree's shapes describe, or the error listing its leaves."""
  info = infer_architecture(flat)
  if info.image_size is None or None in dataclasses.astuple(info)[:5]:
    raise mismatch_error(source, flat, [], [], [],
                         'Its architecture cannot be read from its shapes.')
  return info


def _model_of(info: CheckpointInfo, num_classes, tokens_factor=1, **options):
  """The model of `info`'s sizes, its token mixing `tokens_factor`**2 wider."""
  sizes = dict(num_blocks=info.num_blocks, hidden_dim=info.hidden_dim,
               tokens_mlp_dim=info.tokens_mlp_dim * tokens_factor**2,
               channels_mlp_dim=info.channels_mlp_dim)
  sizes.update({k: options.pop(k) for k in list(options) if k in sizes})
  variant = f'{(info.variant or "S")[0]}_{info.patch_size}'
  return models.create_model(variant, num_classes or None, **sizes, **options)


def load_pretrained(name_or_path, *, num_classes: Optional[int] = None,
                    image_size: Optional[int] = None, **model_options):
  """(model, params) of what `read_weights` reads; images in [-1, 1].

  `num_classes`: None keeps the file's head, another count gives a fresh
  zero head, 0 none. `image_size` may be an integer multiple of the file's
  (Appendix C). gelu_approximate defaults to the file's form."""
  read = read_weights(name_or_path)
  flat, path, entry = read.flat, read.source, read.entry
  model_options.setdefault('gelu_approximate', read.gelu_approximate)
  info = _architecture(flat, path)
  if entry is not None and (info.variant != entry.variant
                            or info.num_classes != entry.num_classes):
    raise PretrainedError(
        f'{path} should hold {entry.name} (Mixer-{entry.variant}, '
        f'{entry.num_classes} classes) but looks like {info.describe()}. '
        f'Delete the file and download it again.')
  size = image_size or info.image_size
  if size % info.patch_size:
    raise PretrainedError(f'image_size={size} is not a multiple of the '
                          f'patch size {info.patch_size}.')
  factor = resolution_factor(info.num_tokens, (size // info.patch_size)**2,
                             info.patch_size)
  classes = info.num_classes if num_classes is None else num_classes
  model = _model_of(info, classes, factor, **model_options)
  fresh = {}
  if classes:
    fresh = {'head/kernel': np.zeros((model.hidden_dim, classes), np.float32),
             'head/bias': np.full((classes,), model.head_bias_init,
                                  np.float32)}
  return model, _restore(flat, models.param_shapes(model, size), path, fresh)


def export_official(params, path: Union[str, os.PathLike]) -> None:
  """Writes a complete parameter tree as an official float32 `.npz`."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  flat = {k: np.asarray(v, dtype=np.float32)
          for k, v in traverse_util.flatten_dict(unwrap(params),
                                                 sep='/').items()}
  source = 'the tree being exported'
  info = _architecture(flat, source)
  _restore(flat, models.param_shapes(_model_of(info, info.num_classes),
                                     info.image_size), source, {})
  buffer = io.BytesIO()  # zipfile seeks, which gs:// files cannot.
  np.savez(buffer, **flat)
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(buffer.getvalue())
