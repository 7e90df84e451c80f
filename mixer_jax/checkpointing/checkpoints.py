"""Orbax checkpoints of the train state: save, resume, preemption, validation.

`Checkpointer` wraps one `orbax.checkpoint.CheckpointManager` whose step
directories hold two items:

  state/   the TrainState pytree (StandardSave: arrays written by TensorStore)
  extra/   a small JSON dict: the caller's data position and notes, the run's
           `fingerprint` (model description) and a per-leaf checksum of the
           state's values (64 bits, see checkpoint_checks) that detects
           silently damaged files.

What it guarantees (each point has a test in tests/test_checkpoints.py):
- Orbax writes a step into a temporary directory and renames it when every
  file is written, so a process killed mid-save (kill -9) leaves the previous
  step as the latest; the half-written directory is removed on the next start.
- Restoring checks the stored tree against the target (leaf paths, shapes,
  dtypes) and the fingerprint before reading any array, and the leaf
  checksums and finiteness after; any mismatch, missing or truncated file raises `CheckpointError`
  naming the step directory and the problem. Nothing is deleted or written
  by a failed restore; `restore(target, step=k)` falls back to an earlier
  step (`--config.resume_step=k` in train.py), and `set_aside_steps_after(k)`
  moves the later steps out of the way without deleting them.
- An unwritable directory fails in `__init__`; a save that would not fit on
  the disk fails before writing, and one that fails while writing raises
  `CheckpointError`; earlier steps are kept either way.
- A state with NaN or infinite values is never saved.
- Checkpoints are arrays and JSON only: nothing is ever unpickled.
- A damaged per-step metrics file (Orbax's `<step>/metrics/metrics`, which
  only ranks steps for keep_best) never makes the directory unusable: a
  reader skips the metrics altogether, a writer renames the damaged file to
  `metrics.damaged` (so that step no longer counts as the best) and says so.
"""

import errno
import functools
import json
import math
import os
import time
import uuid
from typing import Any, Mapping, Optional

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from mixer_jax.checkpointing import checkpoint_checks as checks
from mixer_jax.checkpointing import disk_space
from mixer_jax.checkpointing import preemption
from mixer_jax.checkpointing import read_noise
from mixer_jax.checkpointing import state_digests

# The directory of a training workdir that holds its Orbax steps.
CHECKPOINT_DIR = 'checkpoints'
STATE_ITEM = 'state'
EXTRA_ITEM = 'extra'
BEST_METRIC = 'eval_accuracy'
# Orbax's item (and file) name of a step's metrics: `<step>/metrics/metrics`.
# How long a failed save's leftovers are watched for late writes.
PARTIAL_SAVE_SETTLE_SECONDS = 5.0
_METRICS_ITEM = ocp.checkpoint_manager.METRIC_ITEM_NAME


def _best_metric(metrics) -> float:
  return float(metrics[BEST_METRIC])


def _metrics_readable(path: epath.Path) -> bool:
  """Whether Orbax can read the metrics file `path`: a UTF-8 JSON object."""
  try:
    return isinstance(json.loads(path.read_bytes().decode('utf-8')), dict)
  except (OSError, ValueError):  # UnicodeDecodeError is a ValueError.
    return False


def set_aside_damaged_metrics(directory) -> list:
  """Renames unreadable `<step>/metrics/metrics` files to `metrics.damaged`.

  Orbax reads the metrics of every step when a writable CheckpointManager
  opens and fails on the first damaged one, which would stop every start
  on the directory. The file only ranks its step for keep_best; without it
  the step is kept or deleted by `keep` alone. Run on process 0 before the
  manager opens.

  Returns:
    The renamed files' new paths.
  """
  directory = epath.Path(directory)
  if jax.process_index() > 0 or not directory.is_dir():
    return []
  moved = []
  for step_dir in directory.iterdir():
    metrics = step_dir / _METRICS_ITEM / _METRICS_ITEM
    if not step_dir.name.isdigit() or not metrics.exists():
      continue
    if _metrics_readable(metrics):
      continue
    damaged = metrics.parent / f'{_METRICS_ITEM}.damaged'
    metrics.rename(damaged)
    moved.append(str(damaged))
    logging.warning(
        'The metrics file of step %s in %s was damaged; renamed it to %s. '
        'The step itself is intact; it no longer counts for keep_best.',
        step_dir.name, directory, damaged)
  return moved


def _check_not_a_broken_link(directory) -> None:
  """CheckpointError for a local symbolic link that cannot be followed.

  Without it a link loop reads as a missing directory, or (when writing)
  as `File exists`.
  """
  path = os.fspath(directory)
  if not os.path.islink(path):
    return
  try:
    os.stat(path)
    return
  except OSError as e:
    loop = e.errno == errno.ELOOP
  target = os.readlink(path)
  what = (f'a symbolic link loop ({path} -> {target})' if loop else
          f'a symbolic link to {target}, which does not exist')
  raise checks.CheckpointError(
      f'Checkpoint directory {path} is {what}; fix or remove the link. '
      'Nothing was changed.')


def _note_unusable_steps(directory) -> None:
  """Warns of step names that are no step directory (e.g. a link loop).

  Orbax skips them silently; a step that was expected would then be
  missing without a word.
  """
  for entry in directory.iterdir():
    if entry.name.isdigit() and not entry.is_dir():
      kind = ('a symbolic link that cannot be followed'
              if os.path.islink(os.fspath(entry)) else 'not a directory')
      logging.warning('%s is %s: step %s is skipped.', entry, kind,
                      entry.name)


def _abstract(leaf):
  """A restore target leaf: arrays become shape/dtype/sharding structs."""
  if isinstance(leaf, jax.Array):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
  return leaf


class Checkpointer:
  """Saves and restores the train state in `directory` with Orbax.

  Keeps the `keep` most recent steps and, with `keep_best`, also the step
  with the highest `metrics['eval_accuracy']`. Every process of a multi-host
  run must make the same calls (Orbax synchronises them).
  """

  def __init__(self, directory, *, keep: int, keep_best: bool,
               async_save: bool = True,
               fingerprint: Optional[Mapping[str, Any]] = None,
               read_only: bool = False):
    """Opens (creating if needed) the checkpoint directory.

    Args:
      directory: where step directories are written (local path or gs://).
      keep: number of most recent steps to keep (>= 1).
      keep_best: also keep the step with the best eval accuracy.
      async_save: write arrays in a background thread after `save` returns.
      fingerprint: JSON dict describing the model (`model_fingerprint`);
        saved with every step and compared on restore.
      read_only: only restore (evaluation): nothing in `directory` is
        created, cleaned up or written, so a running job's saves are safe.

    Raises:
      CheckpointError: bad `keep`, a directory that cannot be written, or
        (read_only) one that does not exist.
    """
    if not isinstance(keep, int) or keep < 1:
      raise checks.CheckpointError(
          f'keep={keep!r} must be an integer >= 1 (the number of recent '
          'checkpoints kept).')
    self.directory = epath.Path(os.fspath(directory))
    if not str(self.directory).startswith(('gs://', '/')):
      self.directory = epath.Path(os.path.abspath(os.fspath(directory)))
    self.fingerprint = (checks.jsonable(dict(fingerprint)) if fingerprint
                        else None)
    self.read_only = read_only
    _check_not_a_broken_link(self.directory)
    if not read_only:
      self.check_writable()
    elif not self.directory.is_dir():
      raise checks.CheckpointError(
          f'Checkpoint directory {self.directory} does not exist.')
    _note_unusable_steps(self.directory)
    if not read_only:
      set_aside_damaged_metrics(self.directory)
      if jax.process_count() > 1:  # The others open after process 0 fixed it.
        multihost_utils.sync_global_devices('mixer_jax_metrics_checked')
    policies = [ocp.checkpoint_managers.LatestN(n=keep)]
    best_fn = None
    if keep_best:
      best_fn = _best_metric
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=best_fn, n=1, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        best_fn=best_fn, best_mode='max',
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(
            policies),
        cleanup_tmp_directories=True,  # Remove saves cut short by a kill.
        enable_async_checkpointing=async_save, read_only=read_only,
        # A reader needs no step metrics (they only rank steps for keep_best),
        # so it does not read them: a damaged one cannot stop an evaluation.
        lightweight_initialize=read_only)
    # Naming the handlers lets a fresh manager read metadata before any save.
    registry = ocp.handlers.create_default_handler_registry(**{
        STATE_ITEM: ocp.StandardCheckpointHandler(),
        EXTRA_ITEM: ocp.JsonCheckpointHandler()})
    self._open_manager = lambda: ocp.CheckpointManager(
        self.directory, options=options, handler_registry=registry)
    self._manager = self._open_manager()
    # The signals of an enclosing watch_preemption, else this one's own.
    watching = preemption.innermost()
    self._own_signals = watching is None
    self._signals = (preemption.PreemptionSignals() if watching is None
                     else watching)
    self._writing = None  # Step of the latest save started.
    self._checked = None  # Step of the latest save known to have succeeded.
    self._failed_saves = set()  # Steps whose partial writes were removed.

  # ------------------------------------------------------------ Queries.
  def latest_step(self) -> Optional[int]:
    """The newest complete step, or None if there is none."""
    return self._manager.latest_step()

  def all_steps(self) -> list:
    """Every complete step in the directory, ascending."""
    return sorted(self._manager.all_steps())

  def best_step(self) -> Optional[int]:
    """The kept step with the best eval accuracy (latest if none has one)."""
    return self._manager.best_step()

  def check_writable(self) -> None:
    """Creates the directory, then writes and deletes a probe file in it.

    Raises:
      CheckpointError: naming the directory and the OS error.
    """
    probe = self.directory / (
        f'.write_probe.{jax.process_index()}.{uuid.uuid4().hex[:8]}')
    try:
      self.directory.mkdir(parents=True, exist_ok=True)
      probe.write_text('mixer_jax write probe\n')
      probe.unlink()
    except (OSError, ValueError) as e:
      raise checks.CheckpointError(
          f'Checkpoint directory {self.directory} is not writable ({e}). '
          'Fix its permissions, free space, or choose another --workdir; '
          'no training was started.') from e

  # --------------------------------------------------------------- Save.
  def save(self, step: int, state, *, metrics=None, extra=None,
           force: bool = False) -> bool:
    """Saves `state` as `step` (asynchronously unless async_save=False).

    Args:
      step: the training step; steps already saved are never overwritten.
      state: the TrainState (or any pytree of arrays).
      metrics: optional dict; `metrics['eval_accuracy']` ranks the best step.
      extra: optional JSON-serialisable dict (data position, ...), returned
        by `restore`.
      force: save even when `step` is not newer than the latest one.

    Returns:
      True if a save was started, False if Orbax skipped it (an older step).

    Raises:
      CheckpointError: non-finite state, not enough disk space, an existing
        step with force=True, a non-JSON `extra`, or a failed write; the
        steps already on disk are kept in every case.
    """
    if self.read_only:
      raise checks.CheckpointError(f'{self.directory} was opened read-only.')
    # A write that fails (full disk) leaves the same echoes as a failed read.
    read_noise.quiet_failed_read_noise()
    payload = checks.save_payload(
        state, step, extra, self.fingerprint, self.directory,
        self.latest_step)
    if not str(self.directory).startswith('gs://'):
      disk_space.check_space(state, step, self.directory, self.all_steps)
    ranked = None
    if metrics is not None and BEST_METRIC in metrics:
      value = float(np.asarray(metrics[BEST_METRIC]))
      if math.isfinite(value):
        ranked = {k: float(np.asarray(v)) for k, v in metrics.items()}
    # A failure of the previous (background) save is reported as its own,
    # so an error of the save below is this step's.
    self._check_background_save(wait=True)
    try:
      started = self._manager.save(
          int(step), force=force, metrics=ranked,
          args=ocp.args.Composite(**{
              STATE_ITEM: ocp.args.StandardSave(state),
              EXTRA_ITEM: ocp.args.JsonSave(payload)}))
    except ocp.checkpoint_manager.StepAlreadyExistsError as e:
      raise checks.CheckpointError(
          f'Step {step} already exists in {self.directory}; it is not '
          'overwritten. Resume from it, or use another workdir.') from e
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(step, e) from e
    if started:
      self._writing = int(step)
    return started

  def _check_background_save(self, wait: bool = False):
    """CheckpointError if the latest background save has failed.

    Orbax reports a failed background write only when it is waited for;
    once no save is in progress (or with `wait`) that wait is done (once
    per save).
    """
    if (self._writing is None or self._writing == self._checked or
        (not wait and self._manager.is_saving_in_progress())):
      return
    self.wait_until_finished()
    self._checked = self._writing

  def _remove_partial_save(self, step) -> None:
    """Deletes what a failed save of `step` left (its Orbax temporary).

    Otherwise it stays, filling the disk, until the next start's cleanup.
    A failed save raises at its first failed write while TensorStore may
    still finish others, and those recreate the folder (it makes parent
    folders), so removal repeats until the folder stays gone; `close`
    removes it once more after Orbax has stopped.
    """
    if step is None or jax.process_index() > 0:
      return
    self._failed_saves.add(int(step))
    try:
      quiet_polls = 0
      deadline = time.monotonic() + PARTIAL_SAVE_SETTLE_SECONDS
      while quiet_polls < 2 and time.monotonic() < deadline:
        partials = list(
            self.directory.glob(f'{int(step)}.orbax-checkpoint-tmp*'))
        for partial in partials:
          partial.rmtree()
        quiet_polls = 0 if partials else quiet_polls + 1
        time.sleep(0.2)
      self._manager.reload()  # It counted the failed step as saved.
    except Exception as e:  # pylint: disable=broad-except
      # The error being reported matters more than this cleanup.
      logging.warning('Could not remove the partial save of step %s: %s',
                      step, e)

  def _write_error(self, step, error):
    self._remove_partial_save(step)
    try:
      kept = [s for s in self.all_steps() if s != step]
    except Exception:  # pylint: disable=broad-except
      kept = '(unknown)'
    return checks.CheckpointError(
        f'Saving step {step} to {self.directory} failed: '
        f'{checks.short_error(error)}. Earlier steps {kept} '
        'are kept (the partial write is discarded); check the disk, then '
        'restart to resume from the latest of them.')

  # ------------------------------------------------------------ Restore.
  def restore(self, target, step: Optional[int] = None):
    """Restores `step` (default: the latest) into the structure of `target`.

    Args:
      target: a TrainState (or pytree) of arrays, or of `jax.ShapeDtypeStruct`
        with shardings (e.g. from `jax.eval_shape`); arrays are restored with
        the target's shardings, so a run may resume on another device count.
      step: the step to restore; an earlier one is the fallback when the
        latest is damaged.

    Returns:
      (state, extra): the restored state and the JSON dict given to `save`
      (plus 'step', 'fingerprint' and 'leaf_checksums').

    Raises:
      CheckpointError: no such step; unreadable, corrupt or truncated files;
        or a checkpoint written for another model or config. The message names
        the step directory, the mismatch and the steps to fall back to.
    """
    return self._newest_if_gone(self._restore, target, step)

  def _newest_if_gone(self, read, target, step):
    """read(target, step); with step None, retried once on the newest step.

    A running job's retention may delete the newest step this (read-only)
    reader saw while it reads it: then the reader's list of steps is
    refreshed and the now newest step is read. An explicit `step` is never
    replaced by another.
    """
    if step is not None:
      return read(target, step)
    tried = self.latest_step()
    try:
      return read(target, tried)
    except checks.CheckpointError:
      if tried is None or (self.directory / str(tried)).exists():
        raise  # Not a deletion: a real problem of that step.
      self._reload()
      newest = self.latest_step()
      if newest is None or newest == tried:
        raise
      logging.warning('Step %d of %s was deleted while being read (the '
                      "running job's keep_checkpoints); reading the newest "
                      'step, %d, instead.', tried, self.directory, newest)
      return read(target, newest)

  def _restore(self, target, step):
    step, where, hint, extra, stored = self._open(step)
    checks.check_tree(stored, state_digests.flat(target), where, self._unchanged)
    abstract = jax.tree.map(_abstract, target)
    try:
      state = self._manager.restore(step, args=ocp.args.Composite(**{
          STATE_ITEM: ocp.args.StandardRestore(abstract)}))[STATE_ITEM]
    except Exception as e:  # pylint: disable=broad-except
      raise self._vanished(where) or checks.read_error(where, e, hint) from e
    checks.check_digests(state_digests.state_digests(state),
                         extra.get('leaf_checksums'), where, hint)
    return state, extra

  def restore_params(self, params, step: Optional[int] = None, *,
                     field: str = 'params'):
    """Restores only `state.params` of a saved TrainState (for evaluation).

    Reads neither the optimizer state nor anything else, with the same checks
    as `restore`.

    Args:
      params: target parameter tree (arrays or sharded ShapeDtypeStructs).
      step: the step to read (default: the latest).
      field: the TrainState field to read: 'params', or 'ema_params' (their
        moving average, in runs with config.ema_decay > 0).

    Returns:
      (params, extra).
    """
    return self._newest_if_gone(
        functools.partial(self._restore_params, field=field), params, step)

  def _restore_params(self, params, step, field='params'):
    step, where, hint, extra, stored = self._open(step)
    stored = {k: v for k, v in stored.items() if k.startswith(f'{field}/')}
    wanted = {f'{field}/{k}': v for k, v in state_digests.flat(params).items()}
    checks.check_tree(stored, wanted, where, self._unchanged)
    item = {field: jax.tree.map(_abstract, params)}
    try:
      with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader:
        restored = reader.restore(
            where / STATE_ITEM, args=ocp.args.PyTreeRestore(
                item=item, partial_restore=True,
                restore_args=ocp.checkpoint_utils.construct_restore_args(item)))
    except Exception as e:  # pylint: disable=broad-except
      raise self._vanished(where) or checks.read_error(where, e, hint) from e
    checks.check_digests(state_digests.state_digests(restored),
                         extra.get('leaf_checksums'), where, hint)
    return restored[field], extra

  def read_extra(self, step: Optional[int] = None) -> dict:
    """The JSON dict saved with `step` (default the newest); reads no array.

    Raises:
      CheckpointError: as `restore` (the fingerprint is compared too).
    """
    return self._open(step)[3]

  def _open(self, step):
    """Resolves `step`, reads its JSON and array metadata and fingerprint."""
    read_noise.quiet_failed_read_noise()
    steps = self.all_steps()
    if step is None:
      step = self.latest_step()
      if step is None:
        raise checks.CheckpointError(
            f'No checkpoint to restore in {self.directory}.')
    elif int(step) not in steps:
      raise checks.CheckpointError(f'Step {step} is not in {self.directory}; '
                                   f'the complete steps there are {steps}.')
    step = int(step)
    where = self.directory / str(step)
    earlier = [s for s in steps if s < step]
    hint = self._unchanged
    if earlier:
      hint += (' To fall back to an earlier step, restart with '
               '--config.resume_step=K (or --step=K for evaluate), K one of '
               f'{earlier}; a resume_step already applied in this workdir '
               'is recorded in its resume_step_K.applied file and not '
               'applied again: delete that file to reuse the same K.')
    try:
      extra = self._manager.restore(step, args=ocp.args.Composite(**{
          EXTRA_ITEM: ocp.args.JsonRestore()}))[EXTRA_ITEM]
      # From the item itself: the manager's item_metadata(step) would also
      # read the step's metrics file, which is not needed here.
      stored = ocp.StandardCheckpointHandler().metadata(where / STATE_ITEM)
      stored = state_digests.flat(getattr(stored, 'tree', stored))
      if not isinstance(extra, dict) or not stored:
        raise ValueError('missing state metadata or extra JSON')
    except Exception as e:  # pylint: disable=broad-except
      raise self._vanished(where) or checks.CheckpointError(
          f'Checkpoint {where} cannot be read (corrupt, truncated or not a '
          f'mixer_jax checkpoint): {checks.short_error(e)}.{hint}') from e
    checks.check_fingerprint(self.fingerprint, extra.get('fingerprint'), where,
                             self._unchanged)
    return step, where, hint, extra, stored

  def _reload(self):
    """Re-reads the list of steps (changed by another process or us).

    A reader opens a new lightweight manager: Orbax's `reload` would read
    every step's metrics file, which a reader never needs.
    """
    if self.read_only:
      self._manager.close()
      self._manager = self._open_manager()
    else:
      self._manager.reload()

  def _vanished(self, where) -> Optional[checks.CheckpointError]:
    """The error for a step deleted while it was read, else None.

    A running job's retention (keep_checkpoints) deletes old steps; a reader
    that was reading one then fails, which is no sign of damage.
    """
    if where.exists():
      return None
    try:
      self._reload()  # The list of steps still holds the deleted one.
    except Exception:  # pylint: disable=broad-except
      pass  # The message below matters more than an up-to-date list.
    return checks.CheckpointError(
        f'Checkpoint {where} was deleted while it was being read (a running '
        "job's keep_checkpoints removes old steps). Read the newest step, or "
        f'one the job keeps: {self.all_steps()}.')

  @property
  def _unchanged(self) -> str:
    return f' Nothing in {self.directory} was changed.'

  def set_aside_steps_after(self, step: int) -> list:
    """Moves steps newer than `step` to `<directory>.set_aside/` (kept).

    Used after falling back to an earlier step, so that the newer (damaged)
    steps neither shadow the resumed run's saves nor get deleted.

    Returns:
      The new paths of the moved step directories.
    """
    self.wait_until_finished()
    later = [s for s in self.all_steps() if s > step]
    aside = epath.Path(str(self.directory).rstrip('/') + '.set_aside')
    moved = []
    for s in later:
      dest = aside / str(s)
      if dest.exists():
        dest = aside / f'{s}.{uuid.uuid4().hex[:8]}'
      moved.append(str(dest))
      if jax.process_index() == 0:
        aside.mkdir(parents=True, exist_ok=True)
        (self.directory / str(s)).rename(dest)
    if later:
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices('mixer_jax_set_aside')
      self._reload()
      logging.warning('Set aside steps %s of %s in %s.', later,
                      self.directory, aside)
    return moved

  # ---------------------------------------------------------- Preemption.
  def reached_preemption(self, step: int) -> bool:
    """True when training should save `step` and stop (call every step).

    Also raises CheckpointError as soon as a background save has failed
    (not at the next save, many steps later).

    Multi-host runs ask Orbax, which uses JAX's preemption sync service: a
    SIGTERM on any host makes every host return True at the same step. A
    single process (where that service is not running) also handles SIGTERM
    and SIGINT itself; a second signal interrupts at once.
    """
    self._check_background_save()
    if self._manager.reached_preemption(step):
      return True
    if jax.process_count() > 1:
      return False
    self._signals.install()  # No-op when installed (watch_preemption).
    return self._signals.received is not None

  @property
  def preemption_signal(self) -> Optional[str]:
    """Name of the signal that requested the stop ('SIGTERM'), or None."""
    return self._signals.received

  def _restore_handlers(self):
    if self._own_signals:  # An enclosing watch_preemption restores its own.
      self._signals.restore()

  def wait_until_finished(self) -> None:
    """Blocks until background writes end; CheckpointError if one failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(self._writing, e) from e

  def close(self) -> None:
    """Finishes pending writes, releases Orbax and the signal handlers."""
    self._restore_handlers()
    try:
      self._manager.close()
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(self._writing, e) from e
    finally:
      for step in sorted(self._failed_saves):
        self._remove_partial_save(step)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
