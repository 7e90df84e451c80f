"""Quiets the tracebacks that follow a failed checkpoint read or write.

When one array fails (a truncated file, a full disk), Orbax raises at once
and closes its asyncio loop while TensorStore finishes the other reads or
writes; each one then fails in asyncio's `call_soon_threadsafe` with
'RuntimeError: Event loop is closed', which Python reports through
`sys.unraisablehook` (a traceback per array, after the one-line error).
Neither Orbax nor TensorStore has an option against it, so the programs'
quiet output installs this filter once; `--verbose` shows everything.
Standard library only: programs call it before importing JAX.
"""

import sys
import traceback


def _is_closed_loop_echo(unraisable) -> bool:
  return (unraisable.exc_type is RuntimeError and
          str(unraisable.exc_value) == 'Event loop is closed' and
          any(frame.name == 'call_soon_threadsafe' for frame in
              traceback.extract_tb(unraisable.exc_traceback)))


def quiet_closed_loop_echoes() -> None:
  """Drops those reports; every other unraisable exception still shows."""
  previous = sys.unraisablehook
  if getattr(previous, 'drops_closed_loop_echoes', False):
    return

  def hook(unraisable):
    if not _is_closed_loop_echo(unraisable):
      previous(unraisable)

  hook.drops_closed_loop_echoes = True
  sys.unraisablehook = hook
