"""Orbax checkpoints of the train state: save, verified restore, preemption.

Each step holds `state/` (the arrays) and `extra/` (JSON: the caller's data
position, the model fingerprint and the leaf checksums); docs/reliability.md
describes the guarantees.
"""

import errno
import json
import os
import shutil
import uuid
from typing import Any, Mapping, Optional

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from mixer_jax.checkpointing import checkpoint_checks as checks
from mixer_jax.checkpointing import preemption

# The directory of a training workdir that holds its Orbax steps.
CHECKPOINT_DIR = 'checkpoints'
STATE_ITEM = 'state'
EXTRA_ITEM = 'extra'
BEST_METRIC = 'eval_accuracy'


def _check_link(path: str) -> None:
  """Names a link that cannot be followed (else: 'missing' or 'exists')."""
  if not os.path.islink(path) or os.path.exists(path):
    return
  try:
    os.stat(path)
  except OSError as e:
    target = os.readlink(path)
    raise checks.CheckpointError(
        f'Checkpoint directory {path} is ' +
        (f'a symbolic link loop ({path} -> {target})' if e.errno == errno.ELOOP
         else f'a symbolic link to {target}, which does not exist') +
        '; fix or remove the link. Nothing was changed.') from None


def _damaged_metrics(directory) -> str:
  """Names the step metrics files that are no JSON (Orbax fails on them)."""
  damaged = []
  for path in directory.glob('*/metrics/metrics'):
    try:
      json.loads(path.read_bytes())
    except ValueError:  # UnicodeDecodeError included.
      damaged.append(str(path))
  return (f' Damaged metrics files: {damaged}; they only rank steps for '
          'keep_best: delete them to go on.' if damaged else '')


class Checkpointer:
  """Saves and restores the train state in `directory` with Orbax, keeping
  the `keep` newest steps and, with `keep_best`, the best `eval_accuracy`.

  `read_only` (evaluate, predict) writes and cleans up nothing, so a running
  job's saves are safe. Every process of a multi-host run makes the same
  calls.
  """

  def __init__(self, directory, *, keep: int, keep_best: bool,
               async_save: bool = True,
               fingerprint: Optional[Mapping[str, Any]] = None,
               read_only: bool = False):
    path = os.fspath(directory)
    self.directory = epath.Path(
        path if path.startswith('gs://') else os.path.abspath(path))
    self.fingerprint = (checks.jsonable(dict(fingerprint)) if fingerprint
                        else None)
    _check_link(os.fspath(self.directory))
    if not read_only:
      self._check_writable()
    elif not self.directory.is_dir():
      raise checks.CheckpointError(
          f'Checkpoint directory {self.directory} does not exist.')
    for entry in self.directory.iterdir():  # Orbax skips them silently.
      if entry.name.isdigit() and not entry.is_dir():
        what = ('a symbolic link that cannot be followed'
                if os.path.islink(os.fspath(entry)) else 'not a directory')
        if not read_only:  # Training on from an older step would guess.
          raise checks.CheckpointError(
              f'{entry} is {what}: step {entry.name} cannot be read. Fix '
              f'it, or move it out of {self.directory} to train from the '
              'steps before it. Nothing was changed.')
        logging.warning('%s is %s: step %s is skipped.', entry, what,
                        entry.name)
    policies = [ocp.checkpoint_managers.LatestN(n=keep)]
    best_fn = None
    if keep_best:
      best_fn = lambda metrics: float(metrics[BEST_METRIC])
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=best_fn, n=1, keep_checkpoints_without_metrics=False))
    self._options = ocp.CheckpointManagerOptions(
        best_fn=best_fn, best_mode='max',
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(
            policies),
        cleanup_tmp_directories=not read_only,  # Saves cut short by a kill.
        enable_async_checkpointing=async_save, read_only=read_only,
        lightweight_initialize=read_only)
    try:
      self._manager = self._open_manager()
    except Exception as e:  # pylint: disable=broad-except
      raise checks.CheckpointError(
          f'Orbax cannot open {self.directory}: {checks.short_error(e)}.'
          f'{_damaged_metrics(self.directory)} Nothing was changed.') from e
    # The signals of an enclosing watch_preemption, else this one's own.
    self._own_signals = preemption.watching is None
    self._signals = preemption.watching or preemption.PreemptionSignals()
    self._writing = None  # Step of the latest save started.
    self._checked = None  # Step of the latest save known to have succeeded.

  def _open_manager(self):
    # Naming the handlers lets a fresh manager read metadata before any save.
    return ocp.CheckpointManager(
        self.directory, options=self._options,
        handler_registry=ocp.handlers.create_default_handler_registry(**{
            STATE_ITEM: ocp.PyTreeCheckpointHandler(),
            EXTRA_ITEM: ocp.JsonCheckpointHandler()}))

  def _check_writable(self) -> None:
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

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, *, metrics=None, extra=None) -> bool:
    """Starts saving `state` (and the JSON dict `extra`) as `step`; False
    when Orbax skips a step not newer than the latest (never overwritten).
    A CheckpointError (also for the previous background write) keeps the
    steps on disk."""
    payload = checks.save_payload(state, step, extra, self.fingerprint,
                                  self.directory, self.latest_step())
    if not str(self.directory).startswith('gs://'):
      self._check_space(state, step)
    ranked = None
    if metrics is not None and np.isfinite(metrics.get(BEST_METRIC, np.nan)):
      ranked = {k: float(np.asarray(v)) for k, v in metrics.items()}
    self._check_background_save(wait=True)  # Its error is its own.
    try:
      started = self._manager.save(
          int(step), metrics=ranked,
          args=ocp.args.Composite(**{
              STATE_ITEM: ocp.args.PyTreeSave(state),
              EXTRA_ITEM: ocp.args.JsonSave(payload)}))
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(step, e) from e
    if started:
      self._writing = int(step)
    return started

  def _check_space(self, state, step) -> None:
    """Refuses a save that would not fit on the disk, before writing."""
    need = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)
               if hasattr(x, 'shape'))
    free = shutil.disk_usage(self.directory).free
    if free < need * 1.1:
      raise checks.CheckpointError(
          f'Not enough disk space to save step {step} in {self.directory}: '
          f'needs about {need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free. '
          f'Kept steps {self.all_steps()} are untouched; free space or lower '
          '--config.keep_checkpoints, then restart to resume.')

  def _check_background_save(self, wait: bool = False):
    """Raises a failed background write once, when no save is running."""
    if (self._writing is None or self._writing == self._checked or
        (not wait and self._manager.is_saving_in_progress())):
      return
    self.wait_until_finished()
    self._checked = self._writing

  def _write_error(self, step, error):
    # Orbax listed the failed step; its temporary directory is not a step,
    # and is removed when the directory is next opened for writing.
    self._manager.reload()
    return checks.CheckpointError(
        f'Saving step {step} to {self.directory} failed: '
        f'{checks.short_error(error)}. Earlier steps {self.all_steps()} '
        'are kept (the partial write is discarded); check the disk, then '
        'restart to resume from the latest of them.')

  def wait_until_finished(self) -> None:
    """Blocks until background writes end; CheckpointError if one failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(self._writing, e) from e

  def restore(self, target, step: Optional[int] = None):
    """(state, extra) of `step` (default: the newest), checked; arrays take
    the shardings of `target`, so a run may resume on another device count.
    """
    return self._restore(target, step, partial=False)

  def restore_params(self, params, step: Optional[int] = None, *,
                     field: str = 'params'):
    """(state.<field>, extra), reading no other array ('ema_params' too)."""
    state, extra = self._restore({field: params}, step, partial=True)
    return state[field], extra

  def read_extra(self, step: Optional[int] = None) -> dict:
    """The JSON dict saved with `step` (default the newest), checked."""
    return self._open(self._step(step))[2]

  def _restore(self, target, step, partial):
    tried = self._step(step)
    try:
      return self._read(target, tried, partial)
    except checks.CheckpointError:
      if (self.directory / str(tried)).exists():
        raise  # Not a deletion: a real problem of that step.
    # A running job's keep_checkpoints deleted it. A new manager lists the
    # steps (Orbax's reload would also read every step's metrics).
    self._manager.close()
    self._manager = self._open_manager()
    newest = self.latest_step()
    if step is not None or newest in (None, tried):
      raise checks.CheckpointError(
          f'Checkpoint {self.directory / str(tried)} was deleted while it was '
          "being read (a running job's keep_checkpoints removes old steps). "
          f'Read the newest step, or one the job keeps: {self.all_steps()}.')
    logging.warning('Step %d of %s was deleted while being read; reading the '
                    'newest step, %d, instead.', tried, self.directory, newest)
    return self._read(target, newest, partial)

  def _step(self, step) -> int:
    if step is None:
      if self.latest_step() is None:
        raise checks.CheckpointError(
            f'No checkpoint to restore in {self.directory}.')
      return self.latest_step()
    if int(step) not in self.all_steps():
      raise checks.CheckpointError(
          f'Step {step} is not in {self.directory}; the complete steps '
          f'there are {self.all_steps()}.')
    return int(step)

  def _fallback(self, step) -> str:
    """What every refusal of `step` ends with: the earlier steps to use."""
    text = f' Nothing in {self.directory} was changed.'
    earlier = [s for s in self.all_steps() if s < step]
    if earlier:
      text += (' To fall back to an earlier step, restart with '
               '--config.resume_step=K (or --step=K for evaluate), K one of '
               f'{earlier}; a resume_step already applied in this workdir '
               'is recorded in its resume_step_K.applied file and not '
               'applied again: delete that file to reuse the same K.')
    return text

  def _open(self, step):
    """(where, hint, extra, stored leaves) of `step`; checks its fingerprint."""
    where, hint = self.directory / str(step), self._fallback(step)
    try:
      extra = self._manager.restore(step, args=ocp.args.Composite(**{
          EXTRA_ITEM: ocp.args.JsonRestore()}))[EXTRA_ITEM]
      # The item's own metadata: the manager's would read the metrics too.
      stored = ocp.PyTreeCheckpointHandler().metadata(where / STATE_ITEM)
      stored = checks.flat(stored.tree)
      if not isinstance(extra, dict) or not stored:
        raise ValueError('missing state metadata or extra JSON')
    except Exception as e:  # pylint: disable=broad-except
      raise checks.CheckpointError(
          f'Checkpoint {where} cannot be read (corrupt, truncated or not a '
          f'mixer_jax checkpoint): {checks.short_error(e)}.{hint}') from e
    checks.check_fingerprint(self.fingerprint, extra.get('fingerprint'), where,
                             hint)
    return where, hint, extra, stored

  def _read(self, target, step, partial):
    where, hint, extra, stored = self._open(step)
    if partial:  # Only the leaves under the target's top-level names.
      stored = {k: v for k, v in stored.items() if k.split('/')[0] in target}
    checks.check_tree(stored, checks.flat(target), where, hint)
    try:
      state = self._manager.restore(step, args=ocp.args.Composite(**{
          STATE_ITEM: ocp.args.PyTreeRestore(
              item=target, partial_restore=partial,
              restore_args=ocp.checkpoint_utils.construct_restore_args(
                  target))}))[STATE_ITEM]
    except Exception as e:  # pylint: disable=broad-except
      raise checks.CheckpointError(
          f'Reading the arrays of checkpoint {where} failed (corrupt or '
          f'truncated files): {checks.short_error(e)}.{hint}') from e
    checks.check_digests(checks.state_digests(state),
                         extra.get('leaf_checksums') or {}, where, hint)
    return state, extra

  def set_aside_steps_after(self, step: int) -> None:
    """Moves steps newer than `step` to `<directory>.set_aside/` (kept):
    after a fall back, the newer (damaged) steps would shadow new saves."""
    self.wait_until_finished()
    later = [s for s in self.all_steps() if s > step]
    if not later:
      return
    aside = epath.Path(str(self.directory).rstrip('/') + '.set_aside')
    if jax.process_index() == 0:
      aside.mkdir(parents=True, exist_ok=True)
      for s in later:
        dest = aside / str(s)
        if dest.exists():  # Set aside by an earlier fall back.
          dest = aside / f'{s}.{uuid.uuid4().hex[:8]}'
        (self.directory / str(s)).rename(dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('mixer_jax_set_aside')
    self._manager.reload()
    logging.warning('Set aside steps %s of %s in %s.', later, self.directory,
                    aside)

  def reached_preemption(self, step: int) -> bool:
    """True when training should save `step` and stop (call every step);
    multi-host runs ask Orbax, so that every host stops at the same step."""
    self._check_background_save()
    if self._manager.reached_preemption(step):
      return True
    self._signals.install()  # No-op if installed, or on several hosts.
    return self._signals.received is not None

  @property
  def preemption_signal(self) -> Optional[str]:
    """Name of the signal that requested the stop ('SIGTERM'), or None."""
    return self._signals.received

  def close(self) -> None:
    """Finishes pending writes, releases Orbax and the signal handlers."""
    if self._own_signals:  # An enclosing watch_preemption restores its own.
      self._signals.restore()
    try:
      self._manager.close()
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(self._writing, e) from e
