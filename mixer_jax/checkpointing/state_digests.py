"""Per-leaf checksums of a train state, and its flat leaf paths.

Taken at save time and again after a restore (`checkpoint_checks`): a
restored leaf whose values differ from the saved ones in any bit is caught,
as are non-finite values.
"""

import jax
import jax.numpy as jnp
import numpy as np


def _key_name(key) -> str:
  for attr in ('name', 'key', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def leaf_dtype(leaf):
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
          if jnp.issubdtype(leaf_dtype(v), jnp.number)}


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
