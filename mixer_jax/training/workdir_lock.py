"""One running job per workdir: an `fcntl.flock` on `workdir/.lock`.

The kernel drops the lock when its process ends in any way (kill -9 too),
so a crashed job never leaves the workdir stuck.
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

  def __init__(self, path: str, fd: int, previous: Optional[bytes],
               created: list):
    self.path = path
    self._fd = fd
    self._previous = previous  # The file's bytes before; None: it was new.
    self._created = created  # Directories `acquire` made, innermost first.

  def release(self, refused: bool = False) -> None:
    """Frees the lock; `refused`: leaves the workdir as `acquire` found it."""
    if self._fd is None:
      return
    if refused and self._previous is not None:
      os.ftruncate(self._fd, 0)
      os.pwrite(self._fd, self._previous, 0)
    elif refused:
      os.unlink(self.path)
    os.close(self._fd)  # Frees the flock.
    self._fd = None
    for directory in self._created if refused else []:
      try:
        os.rmdir(directory)
      except OSError:
        break  # Not empty (something else was written): kept.

  def __del__(self):  # A lock that is dropped, e.g. on an error, is freed.
    self.release()


def release(lock: Optional[WorkdirLock], *, refused: bool = False) -> None:
  if lock is not None:
    lock.release(refused)


def acquire(workdir: str) -> Optional[WorkdirLock]:
  """Locks `workdir` for this job (creating it), or raises if it is busy;
  None where nothing is locked (processes other than 0: all hosts share one
  workdir; gs://)."""
  workdir = os.fspath(workdir)
  if jax.process_index() != 0:
    return None
  if '://' in workdir:
    logging.warning('%s is not a local path: it cannot be locked, so make '
                    'sure no other job uses it.', workdir)
    return None
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise checkpoint_checks.CheckpointError(
        f'Workdir {workdir} is a file, not a directory; choose another '
        '--workdir. Nothing was written.')
  created, missing = [], os.path.abspath(workdir)
  while not os.path.exists(missing) and missing != os.path.dirname(missing):
    created.append(missing)
    missing = os.path.dirname(missing)
  path = os.path.join(workdir, LOCK_FILE)
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
      try:
        owner = json.loads(f.read())
        owner = (f'process {owner["pid"]} on host {owner["host"]} (started '
                 f'{owner["started"]})')
      except (ValueError, KeyError, TypeError):
        owner = 'another process (it has not written its pid yet)'
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
