"""SIGTERM/SIGINT as a request to save a checkpoint and stop (one process).

`PreemptionSignals` records the first signal; `watch_preemption` installs
one for a whole run (so a signal during compilation or restore is recorded
too), and each `checkpoints.Checkpointer` made inside it shares it.
Multi-host runs use JAX's preemption sync service instead (via Orbax).
"""

import contextlib
import signal
import threading

from absl import logging
import jax

_PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionSignals:
  """Records SIGTERM/SIGINT as a request to save and stop (one process).

  `install()` replaces the handlers (main thread only); the first signal is
  recorded in `received` ('SIGTERM'), a second one restores the previous
  handlers and is re-raised, so it stops the process at once.
  """

  def __init__(self):
    self.received = None  # Name of the first signal, if any.
    self._old = {}

  @property
  def installed(self) -> bool:
    return bool(self._old)

  def install(self) -> None:
    if (self._old or jax.process_count() > 1 or
        threading.current_thread() is not threading.main_thread()):
      return  # Multi-host runs use JAX's preemption sync service.
    for signum in _PREEMPTION_SIGNALS:
      self._old[signum] = signal.signal(signum, self._on_signal)

  def restore(self) -> None:
    for signum, handler in self._old.items():
      # None: the old handler was not set from Python; use the default.
      signal.signal(signum, signal.SIG_DFL if handler is None else handler)
    self._old = {}

  def _on_signal(self, signum, frame):
    del frame
    if self.received is not None:  # Asked twice: stop now, default behaviour.
      self.restore()
      signal.raise_signal(signum)
      return
    self.received = signal.Signals(signum).name
    logging.warning('Received %s: saving a checkpoint at the next step and '
                    'stopping (send it again to stop immediately).',
                    self.received)


# The PreemptionSignals of the innermost `watch_preemption` in progress.
_watching = []


def innermost():
  """The PreemptionSignals of the innermost `watch_preemption`, or None."""
  return _watching[-1] if _watching else None


@contextlib.contextmanager
def watch_preemption():
  """Records SIGTERM/SIGINT from now on, for the Checkpointers made inside.

  Without it a Checkpointer installs its handlers at its first
  `reached_preemption` call (the first training step), and a signal during
  compilation or restore would end the process (exit 143). Inside it, such
  a signal is recorded and the first `reached_preemption` returns True.
  Also a decorator (`@watch_preemption()`).

  Yields:
    The PreemptionSignals (its `received` names the signal, if any).
  """
  signals = PreemptionSignals()
  signals.install()
  _watching.append(signals)
  try:
    yield signals
  finally:
    _watching.remove(signals)
    signals.restore()
