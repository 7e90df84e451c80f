"""One running job per workdir: an advisory lock held while training.

`acquire(workdir)` takes an exclusive `fcntl.flock` on `workdir/.lock`
and writes the owner (pid, host, start time) into it; a second job on the
same workdir gets `WorkdirLockedError` naming that owner. The kernel drops
the lock when the owning process exits in any way, kill -9 included, so a
crashed job never leaves the workdir stuck (the file stays, unlocked, and
the next start takes it over). In a multi-host run only process 0 takes the
lock (all hosts share one workdir). Paths that are not local files (gs://)
cannot be flock'ed; they are not locked, with a warning.
"""

import datetime
import fcntl
import json
import os
import socket
from typing import Optional

from absl import logging
import jax

from mixer_jax.checkpointing import checkpoint_checks

LOCK_FILE = '.lock'


class WorkdirLockedError(checkpoint_checks.CheckpointError):
  """Another running process holds the workdir."""


class WorkdirLock:
  """An acquired lock; `release()` (or process exit) frees it."""

  def __init__(self, path: str, fd: int, previous: Optional[bytes] = None,
               created: tuple = ()):
    self.path = path
    self._fd = fd
    self._previous = previous  # The file's bytes before; None: it was new.
    self._created = created  # Directories `acquire` made, innermost first.

  def undo(self) -> None:
    """Releases the lock and puts its file back as it was before `acquire`.

    For a start that is refused after taking the lock: it leaves the
    workdir byte for byte as it found it (a new lock file and the
    directories made for it are removed again, if still empty).
    """
    if self._fd is None:
      return
    if self._previous is not None:
      os.ftruncate(self._fd, 0)
      os.pwrite(self._fd, self._previous, 0)
    else:
      os.unlink(self.path)
    self.release()
    for directory in self._created:
      try:
        os.rmdir(directory)
      except OSError:
        break  # Not empty (something else was written): kept.

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __del__(self):  # A lock that is dropped, e.g. on an error, is freed.
    self.release()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()


def release(lock: Optional[WorkdirLock], *, refused: bool = False) -> None:
  """Releases a lock from `acquire` (None: nothing to release).

  With `refused`, also undoes what `acquire` wrote (`WorkdirLock.undo`).
  """
  if lock is not None:
    if refused:
      lock.undo()
    else:
      lock.release()


def _missing_parents(directory: str) -> tuple:
  """`directory` and its parents that do not exist yet, innermost first."""
  missing = []
  directory = os.path.abspath(directory)
  while not os.path.exists(directory):
    missing.append(directory)
    parent = os.path.dirname(directory)
    if parent == directory:
      break
    directory = parent
  return tuple(missing)


def _describe_owner(text: str) -> str:
  try:
    owner = json.loads(text)
    return (f'process {owner["pid"]} on host {owner["host"]} (started '
            f'{owner["started"]})')
  except (ValueError, KeyError, TypeError):
    return 'another process (it has not written its pid yet)'


def acquire(workdir: str, process_index: Optional[int] = None
            ) -> Optional[WorkdirLock]:
  """Locks `workdir` for this job (creating it), or raises if it is busy.

  Args:
    workdir: the run's directory.
    process_index: this process's index (default `jax.process_index()`);
      only process 0 locks, the others return None.

  Returns:
    The held lock (None on processes other than 0 and for gs:// paths).

  Raises:
    WorkdirLockedError: a live process holds the lock; names its pid, host
      and start time.
  """
  if process_index is None:
    process_index = jax.process_index()
  if process_index != 0:
    return None
  workdir = os.fspath(workdir)
  if '://' in workdir:
    logging.warning('%s is not a local path: it cannot be locked, so make '
                    'sure no other job uses it.', workdir)
    return None
  path = os.path.join(workdir, LOCK_FILE)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise checkpoint_checks.CheckpointError(
        f'Workdir {workdir} is a file, not a directory; choose another '
        '--workdir. Nothing was written.')
  created = _missing_parents(workdir)
  existed = os.path.exists(path)
  try:
    os.makedirs(workdir, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise checkpoint_checks.CheckpointError(
        f'Workdir {workdir} is not writable ({e}). Fix its permissions or '
        'choose another --workdir; no training was started.') from e
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    with os.fdopen(fd, 'r') as f:
      owner = _describe_owner(f.read())
    raise WorkdirLockedError(
        f'Workdir {workdir} is in use by {owner}: two jobs on one workdir '
        'would overwrite each other\'s checkpoints and metrics. Wait for it '
        'to finish or stop it, or choose another --workdir. Nothing was '
        'written.') from None
  owner = {'pid': os.getpid(), 'host': socket.gethostname(),
           'started': datetime.datetime.now().isoformat(timespec='seconds')}
  previous = os.pread(fd, os.fstat(fd).st_size, 0) if existed else None
  os.ftruncate(fd, 0)
  os.pwrite(fd, (json.dumps(owner) + '\n').encode(), 0)
  return WorkdirLock(path, fd, previous, created)
