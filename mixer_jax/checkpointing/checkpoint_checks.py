"""What makes a checkpoint trustworthy: leaf checksums, tree and fingerprint.

Each refusal is a `CheckpointError` naming the step directory and problem;
`hint` is the caller's closing sentence (the steps to fall back to).
"""

import json
import jax
import jax.numpy as jnp
import numpy as np

from mixer_jax.errors import UserError


class CheckpointError(UserError, ValueError):
  """A checkpoint cannot be written, found, read or used for this run."""


def short_error(error) -> str:
  """The first line of an exception, at most 300 characters."""
  text = str(error).strip().split('\n', 1)[0].split(' See full ', 1)[0]
  return f'{type(error).__name__}: {text[:300].rstrip(".")}'


def jsonable(value):
  """`value` as plain JSON: numpy and JAX values become numbers and lists."""
  return json.loads(json.dumps(
      value, default=lambda leaf: np.asarray(leaf).tolist()))


def flat(tree) -> dict:
  """{'params/stem/kernel': leaf} for any pytree (dataclass, dict, tuple)."""
  return {jax.tree_util.keystr(path, simple=True, separator='/'): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _dtype(leaf):
  # Not getattr(leaf, 'dtype', default): building the default would fetch
  # the array, which fails for arrays spanning several hosts.
  return leaf.dtype if hasattr(leaf, 'dtype') else np.asarray(leaf).dtype


def _checksum(x):
  """Two 32-bit sums of hashed (word, position) pairs, modulo 2**32.

  Word i (the bits of the values as uint32) contributes h_i = mix(word_i +
  i * golden ratio), mix being murmur3's finaliser (a bijection); the sums
  are sum(h_i) and sum(h_i * (2i + 1)). A change confined to one word always
  changes both; other changes go undetected with a chance of about 2**-64.
  Integer sums do not depend on the reduction order: the result is exact on
  any device and sharding.
  """
  x = jnp.ravel(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  if x.dtype.itemsize < 4:
    unsigned = {1: jnp.uint8, 2: jnp.uint16}[x.dtype.itemsize]
    words = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  else:
    words = jnp.ravel(jax.lax.bitcast_convert_type(x, jnp.uint32))
  index = jnp.arange(words.size, dtype=jnp.uint32)
  h = words + index * jnp.uint32(0x9E3779B9)
  h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
  h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
  h = h ^ (h >> 16)
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


def state_digests(state) -> dict:
  """{path: (16 hex digits, all finite)} of the numeric leaves, on device."""
  numeric = {k: v for k, v in flat(state).items()
             if jnp.issubdtype(_dtype(v), jnp.number)}
  digests = _leaf_digests(list(numeric.values()))
  if not digests.is_fully_addressable:
    digests = digests.addressable_data(0)  # Replicated: every host has it.
  rows = np.asarray(digests).tolist()
  return {path: (f'{a:08x}{b:08x}', bool(finite))
          for path, (a, b, finite) in zip(numeric, rows)}


def _listed(items, sep=', ', shown=8) -> str:
  """The first `shown` of `items`, params/ first, and how many more."""
  items = sorted(items, key=lambda text: (not text.startswith('params/'), text))
  more = f' (and {len(items) - shown} more)' if len(items) > shown else ''
  return sep.join(items[:shown]) + more


def save_payload(state, step, extra, fingerprint, directory, latest_step):
  """The JSON saved with `step`: `extra`, checksums and fingerprint;
  refuses non-finite values in `state` and an `extra` that is not JSON."""
  digests = state_digests(state)
  bad = [path for path, (_, finite) in digests.items() if not finite]
  if bad:
    last_good = (f'The last good checkpoint is step {latest_step}.'
                 if latest_step is not None else
                 'No checkpoint was saved before.')
    raise CheckpointError(
        f'Refusing to save step {step} to {directory}: non-finite '
        f'values in {_listed(bad)}. {last_good}')
  try:
    payload = {**jsonable(extra or {}), 'step': int(step),
               'fingerprint': fingerprint, 'leaf_checksums': {
                   path: digest for path, (digest, _) in digests.items()}}
    json.dumps(payload, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f'extra for step {step} is not plain JSON: {e}.')
  return payload


def check_tree(stored: dict, wanted: dict, where, hint):
  problems = [f'{p}: missing from the checkpoint' for p in wanted
              if p not in stored]
  problems += [f'{p}: in the checkpoint but not in this run' for p in stored
               if p not in wanted]
  for path in wanted.keys() & stored.keys():
    a, b = stored[path], wanted[path]
    a_shape, b_shape = tuple(a.shape), tuple(np.shape(b))
    a_dtype, b_dtype = np.dtype(a.dtype), np.dtype(_dtype(b))
    if a_shape != b_shape or (b_shape and a_dtype != b_dtype):
      problems.append(f'{path}: checkpoint {a_shape} {a_dtype}, this run '
                      f'{b_shape} {b_dtype}')
  if problems:
    raise CheckpointError(
        f'Checkpoint {where} does not match this run\'s model/config: '
        f'{_listed(problems, sep="; ")}. It '
        'was written for another variant or config; use the matching config, '
        f'or another workdir.{hint}')


def check_digests(restored: dict, saved: dict, where, hint):
  """Refuses non-finite values and checksums that differ from `saved`."""
  bad_values = [p for p, (_, finite) in restored.items() if not finite]
  if bad_values:
    raise CheckpointError(
        f'Checkpoint {where} holds NaN or infinite values in '
        f'{_listed(bad_values)}; it cannot be used.{hint}')
  names = [f'{p} (no checksum stored)' if p not in saved else p
           for p, (digest, _) in restored.items() if saved.get(p) != digest]
  if names:
    raise CheckpointError(
        f'Checkpoint {where} is corrupt: the values read differ from those '
        f'saved (checksum mismatch) in {_listed(names)}.{hint}')


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
