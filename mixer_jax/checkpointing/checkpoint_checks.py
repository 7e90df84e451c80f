"""Checks that make a checkpoint trustworthy before and after it is read.

Used by `checkpoints.Checkpointer`: the model fingerprint stored with every
step, the comparison of the stored tree (leaf paths, shapes, dtypes) with
the restore target, and per-leaf checksums of the values taken at save time
and compared after reading, which catch files that decode without error but
hold other values (bit rot, swapped files). Also refuses non-finite states,
before they are written and after they are read.
"""

import dataclasses
import json
import logging
import shutil
import sys
import traceback
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mixer_jax import models


class CheckpointError(ValueError):
  """A checkpoint cannot be written, found, read or used for this run."""


def model_fingerprint(config, num_classes: int) -> dict:
  """What a checkpoint must share with `config` to be resumed or evaluated.

  Covers the architecture (the resolved sizes, and fields that change what
  the parameters compute while keeping shapes, e.g. gelu_approximate) but not
  training hyperparameters, which may legitimately change between restarts.

  Args:
    config: a config from configs/ (reads config.model and image_size).
    num_classes: the resolved class count (not -1).

  Returns:
    A JSON-serialisable dict.
  """
  model = config.model
  spec = models.get_spec(
      model.variant, num_blocks=model.num_blocks, hidden_dim=model.hidden_dim,
      tokens_mlp_dim=model.tokens_mlp_dim,
      channels_mlp_dim=model.channels_mlp_dim)
  return {**dataclasses.asdict(spec),
          'gelu_approximate': bool(model.gelu_approximate),
          'image_size': int(config.image_size),
          'num_classes': int(num_classes)}


def _key_name(key) -> str:
  for attr in ('name', 'key', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _dtype(leaf):
  # Not getattr(leaf, 'dtype', default): building the default would fetch
  # the array, which fails for arrays spanning several hosts.
  return leaf.dtype if hasattr(leaf, 'dtype') else np.asarray(leaf).dtype


def flat(tree) -> dict:
  """{'params/stem/kernel': leaf} for any pytree (dataclass, dict, tuple).

  Not `flax.traverse_util.flatten_dict`: that takes nested dicts only, and
  a TrainState (with optax's tuple states inside) is a general pytree.
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(_key_name(k) for k in path): leaf for path, leaf in leaves}


# Constants of the checksum (golden-ratio multiplier, murmur3 finaliser).
_GOLDEN = 0x9E3779B9
_MIX_1, _MIX_2 = 0x85EBCA6B, 0xC2B2AE35


def _words(x):
  """The bits of `x` as a flat uint32 vector (one or more words per value)."""
  x = jnp.ravel(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = x.dtype.itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size < 4:
    unsigned = {1: jnp.uint8, 2: jnp.uint16}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  return jnp.ravel(jax.lax.bitcast_convert_type(x, jnp.uint32))


def _mix(h):
  """murmur3's 32-bit finaliser: a bijection of uint32 that spreads bits."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(_MIX_1)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(_MIX_2)
  return h ^ (h >> 16)


def _checksum(x):
  """Two 32-bit sums of hashed (word, position) pairs, modulo 2**32.

  Word i contributes h_i = mix(word_i + i * GOLDEN); the sums are sum(h_i)
  and sum(h_i * (2i + 1)). `mix` is a bijection and 2i + 1 is odd, so a
  change confined to one word always changes both sums; other changes go
  undetected with a chance of about 2**-64. Integer sums do not depend on
  the reduction order, so the result is exact on any device and sharding.
  """
  words = _words(x)
  index = jnp.arange(words.size, dtype=jnp.uint32)
  h = _mix(words + index * jnp.uint32(_GOLDEN))
  return jnp.stack([jnp.sum(h, dtype=jnp.uint32),
                    jnp.sum(h * (2 * index + 1), dtype=jnp.uint32)])


@jax.jit
def _leaf_digests(leaves):
  """Per leaf: (checksum word 1, checksum word 2, all finite) as uint32."""
  out = []
  for x in leaves:
    x = jnp.asarray(x)
    finite = (jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
              else jnp.asarray(True))
    out.append(jnp.concatenate([_checksum(x),
                                finite.astype(jnp.uint32)[None]]))
  return jnp.stack(out) if out else jnp.zeros((0, 3), jnp.uint32)


def _numeric(state) -> dict:
  return {k: v for k, v in flat(state).items()
          if jnp.issubdtype(_dtype(v), jnp.number)}


def state_digests(state) -> dict:
  """{path: (checksum hex string, all finite)} over the numeric leaves.

  The checksum (16 hex digits) covers every bit of the leaf's values, so a
  restored leaf that differs from the saved one in any value is caught.
  Computed in one jitted pass where the arrays live (device, any sharding).
  """
  numeric = _numeric(state)
  digests = _leaf_digests(list(numeric.values()))
  if hasattr(digests, 'addressable_data') and not digests.is_fully_addressable:
    digests = digests.addressable_data(0)  # Replicated: every host has it.
  rows = np.asarray(digests).tolist()
  return {path: (f'{a:08x}{b:08x}', bool(finite))
          for path, (a, b, finite) in zip(numeric, rows)}


def short_error(error) -> str:
  """The first line of an exception, at most 300 characters."""
  text = str(error).strip().split('\n', 1)[0].split(' See full ', 1)[0]
  return f'{type(error).__name__}: {text[:300].rstrip(".")}'


def jsonable(value):
  """Numpy/JAX scalars and arrays to plain JSON values."""
  if isinstance(value, Mapping):
    return {str(k): jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [jsonable(v) for v in value]
  if hasattr(value, 'tolist'):
    return np.asarray(value).tolist()
  return value


# Fraction of headroom required on the disk above the state's size.
_SPACE_MARGIN = 1.1


def save_payload(state, step, extra, fingerprint, directory, latest_step):
  """The `extra` JSON saved with `step`; CheckpointError if not savable.

  Refuses a state with non-finite values (`latest_step()` names the last
  good step) and an `extra` that is not plain JSON.
  """
  digests = state_digests(state)
  bad = [path for path, (_, finite) in digests.items() if not finite]
  if bad:
    latest = latest_step()
    last_good = (f'The last good checkpoint is step {latest}.'
                 if latest is not None else 'No checkpoint was saved before.')
    raise CheckpointError(
        f'Refusing to save step {step} to {directory}: non-finite '
        f'values in {", ".join(bad[:5])}. {last_good}')
  payload = dict(jsonable(extra or {}))
  payload.update(step=int(step), fingerprint=fingerprint,
                 leaf_checksums={k: v[0] for k, v in digests.items()})
  try:
    json.dumps(payload, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise CheckpointError(
        f'extra for step {step} is not plain JSON: {e}.')
  return payload


def check_space(state, step, directory, all_steps):
  """Fails early when `state` would not fit on the local disk."""
  need = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(state) if hasattr(x, 'shape'))
  free = shutil.disk_usage(directory).free
  if free < need * _SPACE_MARGIN:
    raise CheckpointError(
        f'Not enough disk space to save step {step} in {directory}: '
        f'needs about {need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free. '
        f'Kept steps {all_steps()} are untouched; free space or lower '
        '--config.keep_checkpoints, then restart to resume.')


# Orbax's per-shard read coroutine; when one read fails, the others are
# garbage-collected unfinished and each reports its own echo of the error.
_ORBAX_READ_COROUTINE = '_read_array_index_and_device_put'


def _is_closed_loop_noise(unraisable) -> bool:
  """An echo of a failed read: a TensorStore read finishing after Orbax
  closed its event loop, or an abandoned Orbax read coroutine."""
  code = getattr(unraisable.object, 'cr_code', None)
  if code is not None and code.co_name == _ORBAX_READ_COROUTINE:
    return True
  if (unraisable.exc_type is not RuntimeError or
      str(unraisable.exc_value) != 'Event loop is closed'):
    return False
  frames = traceback.extract_tb(unraisable.exc_traceback)
  return any(f.name == 'call_soon_threadsafe' for f in frames)


def _quiet_unraisable_hook(unraisable):
  if not _is_closed_loop_noise(unraisable):
    _previous_unraisable_hook(unraisable)


_previous_unraisable_hook = None

# Words of TensorStore's errors about Orbax's array files.
_TENSORSTORE_READ_ERROR = ('"zarr" driver', 'in OCDBT database')


class _DropAbandonedReadErrors(logging.Filter):
  """Drops asyncio's 'Task exception was never retrieved' for array reads.

  The same echo as below, reported by asyncio when it collects an
  abandoned TensorStore read task: after the first failed read, Orbax
  raises and never awaits the others.
  """

  def filter(self, record):
    if not str(record.msg).startswith('Task exception was never retrieved'):
      return True
    error = record.exc_info[1] if record.exc_info else None
    return not any(word in str(error) for word in _TENSORSTORE_READ_ERROR)


def quiet_failed_read_noise() -> None:
  """Drops the echoes of a failed read that follow its clear error.

  When one array of a checkpoint fails to read, Orbax raises at once and
  closes its asyncio loop while TensorStore still completes the other reads;
  each completion then reports 'RuntimeError: Event loop is closed' through
  `sys.unraisablehook` (thousands of traceback lines for a large state).
  This wraps the hook so that exactly those reports are dropped; every
  other unraisable exception is passed on; asyncio's reports of the
  abandoned read tasks are dropped likewise. Idempotent.
  """
  global _previous_unraisable_hook
  if sys.unraisablehook is not _quiet_unraisable_hook:
    _previous_unraisable_hook = sys.unraisablehook
    sys.unraisablehook = _quiet_unraisable_hook
  asyncio_logger = logging.getLogger('asyncio')
  if not any(isinstance(f, _DropAbandonedReadErrors)
             for f in asyncio_logger.filters):
    asyncio_logger.addFilter(_DropAbandonedReadErrors())


def read_error(where, error, hint):
  return CheckpointError(
      f'Reading the arrays of checkpoint {where} failed (corrupt or truncated '
      f'files): {short_error(error)}.{hint}')


def _params_first(text):
  return (not text.startswith('params/'), text)


def check_tree(stored: dict, wanted: dict, where, hint):
  """Compares stored leaf paths/shapes/dtypes with the target's."""
  problems = [f'{p}: missing from the checkpoint' for p in wanted
              if p not in stored]
  problems += [f'{p}: in the checkpoint but not in this run' for p in stored
               if p not in wanted]
  for path in wanted.keys() & stored.keys():
    a, b = stored[path], wanted[path]
    a_shape, b_shape = tuple(a.shape), tuple(np.shape(b))
    a_dtype = np.dtype(a.dtype)
    b_dtype = np.dtype(_dtype(b))
    if a_shape != b_shape or (b_shape and a_dtype != b_dtype):
      problems.append(f'{path}: checkpoint {a_shape} {a_dtype}, this run '
                      f'{b_shape} {b_dtype}')
  if problems:
    more = f' (and {len(problems) - 8} more)' if len(problems) > 8 else ''
    raise CheckpointError(
        f'Checkpoint {where} does not match this run\'s model/config: '
        f'{"; ".join(sorted(problems, key=_params_first)[:8])}{more}. It '
        'was written for another variant or config; use the matching config, '
        f'or another workdir.{hint}')


def check_digests(restored: dict, saved, where, hint):
  """Compares checksums after a restore with those taken at save time.

  Also refuses non-finite values (which a save never writes), naming the
  leaves. `saved` is None for checkpoints written before checksums were
  stored; those get only the finiteness check.
  """
  bad_values = [p for p, (_, finite) in restored.items() if not finite]
  if bad_values:
    raise CheckpointError(
        f'Checkpoint {where} holds NaN or infinite values in '
        f'{", ".join(sorted(bad_values, key=_params_first)[:8])}; it cannot '
        f'be used.{hint}')
  if saved is None:
    return
  bad = [p for p, (digest, _) in restored.items()
         if p in saved and saved[p] != digest]
  missing = [p for p in restored if p not in saved]
  if bad or missing:
    names = sorted(bad, key=_params_first) + [
        f'{p} (no checksum stored)' for p in missing]
    raise CheckpointError(
        f'Checkpoint {where} is corrupt: the values read differ from those '
        f'saved (checksum mismatch) in {", ".join(names[:5])}'
        f'{f" and {len(names) - 5} more leaves" if len(names) > 5 else ""}.'
        f'{hint}')


def check_fingerprint(expected, stored, where, hint):
  """Raises if the stored model description differs from `expected`."""
  if not expected or not stored:
    return
  diff = {k: (stored.get(k), v) for k, v in expected.items()
          if stored.get(k) != v}
  if diff:
    details = '; '.join(f'{k}: checkpoint {a!r}, this run {b!r}'
                        for k, (a, b) in sorted(diff.items()))
    raise CheckpointError(
        f'Checkpoint {where} was written for another model/config '
        f'({details}). Use the matching config, or another workdir.{hint}')
