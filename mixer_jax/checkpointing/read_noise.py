"""Quiets the echoes of a failed checkpoint read that follow its clear error.

Process-wide (a `sys.unraisablehook` wrapper and a filter on the `asyncio`
logger), installed by the Checkpointer before it reads arrays.
"""

import logging
import sys
import traceback


def _is_abandoned_orbax_read(unraisable) -> bool:
  """Whether `unraisable` reports one of Orbax's per-shard read coroutines,
  garbage-collected unfinished after another read failed.

  Orbax has no public API that names or marks these coroutines, so this is
  the one place that relies on a private name of Orbax
  (`_read_array_index_and_device_put`, orbax-checkpoint 0.12); if Orbax
  renames it, the echoes come back (noise only, never a hidden error).
  """
  code = getattr(unraisable.object, 'cr_code', None)
  return (code is not None and
          code.co_name == '_read_array_index_and_device_put')


def _is_closed_loop_noise(unraisable) -> bool:
  """An echo of a failed read: a TensorStore read finishing after Orbax
  closed its event loop, or an abandoned Orbax read coroutine."""
  if _is_abandoned_orbax_read(unraisable):
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
