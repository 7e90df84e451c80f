"""Checks that make a checkpoint trustworthy before and after it is read.

Used by `checkpoints.Checkpointer`: the model fingerprint stored with every
step, the comparison of the stored tree (leaf paths, shapes, dtypes) with
the restore target, and per-leaf sums taken at save time and compared after
reading, which catch files that decode without error but hold other values.
Also refuses non-finite states before they are written.
"""

import dataclasses
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
  """{'params/stem/kernel': leaf} for any pytree (dataclass, dict, tuple)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(_key_name(k) for k in path): leaf for path, leaf in leaves}


@jax.jit
def _leaf_sums(leaves):
  """Per-leaf (sum, sum of |x|, all finite) in float32, one device pass."""
  out = []
  for x in leaves:
    x = jnp.asarray(x, jnp.float32)
    out.append(jnp.stack([jnp.sum(x), jnp.sum(jnp.abs(x)),
                          jnp.all(jnp.isfinite(x)).astype(jnp.float32)]))
  return jnp.stack(out) if out else jnp.zeros((0, 3), jnp.float32)


def state_sums(state) -> dict:
  """{path: (sum, sum|x|, finite)} over the numeric leaves of `state`."""
  numeric = {k: v for k, v in flat(state).items()
             if jnp.issubdtype(_dtype(v), jnp.number)}
  sums = _leaf_sums(list(numeric.values()))
  if hasattr(sums, 'addressable_data') and not sums.is_fully_addressable:
    sums = sums.addressable_data(0)  # Replicated: every host holds it all.
  return dict(zip(numeric, np.asarray(sums, np.float64).tolist()))


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


def check_sums(restored: dict, saved, where, hint):
  """Compares per-leaf sums after a restore with those taken at save."""
  if not saved:
    return
  bad = []
  for path, (total, magnitude) in saved.items():
    if path not in restored:
      continue
    got_total, got_magnitude, _ = restored[path]
    tol = 1e-3 * magnitude + 1e-6
    if not (abs(got_total - total) <= tol and
            abs(got_magnitude - magnitude) <= tol):
      bad.append(f'{path} (sum {got_total:.6g}, saved {total:.6g})')
  if bad:
    raise CheckpointError(
        f'Checkpoint {where} is corrupt: the values read differ from those '
        f'saved in {", ".join(bad[:5])}.{hint}')


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
