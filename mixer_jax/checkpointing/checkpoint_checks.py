"""Checks that make a checkpoint trustworthy before and after it is read.

Used by `checkpoints.Checkpointer`, each with the message that names the
step and the problem: the comparison of the stored model fingerprint
(fingerprint.py) and tree (leaf paths, shapes, dtypes) with the restore
target, and of the per-leaf checksums taken at save time with those after
reading (state_digests.py), which catch files that decode without error but
hold other values (bit rot, swapped files). Also refuses non-finite states,
before they are written and after they are read.
"""

import json
from typing import Mapping

import numpy as np

from mixer_jax.checkpointing import state_digests
from mixer_jax.errors import UserError


class CheckpointError(UserError, ValueError):
  """A checkpoint cannot be written, found, read or used for this run."""


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


def save_payload(state, step, extra, fingerprint, directory, latest_step):
  """The `extra` JSON saved with `step`; CheckpointError if not savable.

  Refuses a state with non-finite values (`latest_step()` names the last
  good step) and an `extra` that is not plain JSON.
  """
  digests = state_digests.state_digests(state)
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
    b_dtype = np.dtype(state_digests.leaf_dtype(b))
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
