"""SIGTERM/SIGINT as a request to save a checkpoint and stop (one process).

Multi-host runs use JAX's preemption sync service instead (via Orbax).
"""

import contextlib
import os
import signal
import sys
import threading

from absl import logging
import jax

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionSignals:
  """Records the first signal in `received` ('SIGTERM'); a second one
  restores the previous handlers and is re-raised: it stops at once."""

  def __init__(self):
    self.received = None  # Name of the first signal, if any.
    self._old = {}

  def install(self) -> None:
    if (self._old or jax.process_count() > 1 or
        threading.current_thread() is not threading.main_thread()):
      return  # Multi-host runs use JAX's preemption sync service.
    self._old = {s: signal.signal(s, self._on_signal) for s in _SIGNALS}

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
    if not _before_training:  # Else stop_at_once_before_training ends it.
      logging.warning('Received %s: saving a checkpoint at the next step and '
                      'stopping (send it again to stop immediately).',
                      self.received)


# The PreemptionSignals of the `watch_preemption` in progress, if any.
watching = None


@contextlib.contextmanager
def watch_preemption():
  """Records SIGTERM/SIGINT for the Checkpointers made inside (else their
  handlers come at the first step, and an earlier signal ends the process).
  """
  global watching
  signals, outer = PreemptionSignals(), watching
  signals.install()
  watching = signals
  try:
    yield signals
  finally:
    watching = outer
    signals.restore()


# True from `stop_at_once_before_training` until `training_started`.
_before_training = False


def training_started() -> None:
  """From now on a stop request saves a checkpoint (see below)."""
  global _before_training
  _before_training = False


def _stop_on_signal(read_fd: int) -> None:
  """Ends the process on a SIGTERM/SIGINT while `_before_training`."""
  while data := os.read(read_fd, 64):
    stops = [s for s in data if s in _SIGNALS]
    if stops and _before_training:
      print(f'Received {signal.Signals(stops[0]).name} before the first '
            'training step: stopped at once, nothing new to save. The same '
            'command starts (or resumes) the run again.', file=sys.stderr,
            flush=True)
      sys.stdout.flush()
      os._exit(0)  # pylint: disable=protected-access
  os.close(read_fd)


@contextlib.contextmanager
def stop_at_once_before_training():
  """For a program: a stop request before the first step ends it at once.

  Before `training_started()` there is nothing new to save, and the main
  thread may be in XLA's compiler for minutes, where no Python handler
  runs; Python's C-level handler still writes the signal's number to the
  wakeup fd, which a thread reads. Single-process main thread only.
  """
  global _before_training
  if (threading.current_thread() is not threading.main_thread() or
      jax.process_count() > 1):
    yield
    return
  read_fd, write_fd = os.pipe()
  os.set_blocking(write_fd, False)
  previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
  _before_training = True
  threading.Thread(target=_stop_on_signal, args=(read_fd,), daemon=True,
                   name='stop_at_once_before_training').start()
  try:
    yield
  finally:
    _before_training = False
    signal.set_wakeup_fd(previous)
    os.close(write_fd)  # The thread reads the end of the pipe and returns.
