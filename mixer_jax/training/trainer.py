"""The training job: `train_and_evaluate(config, workdir)`.

Every check comes before anything is compiled or written; then
`_restore_or_init` and the step loop `_train`. Exact resume, preemption
and the NaN stop: docs/reliability.md.
"""

import dataclasses
import math
import os
import time
from typing import Any, Dict

from absl import logging
from etils import epath
import jax
import numpy as np

from mixer_jax import model_from_config
from mixer_jax import models
from mixer_jax.checkpointing import checkpoints
from mixer_jax.checkpointing import fingerprint
from mixer_jax.checkpointing import preemption
from mixer_jax.data import input_pipeline
from mixer_jax.training import compiled
from mixer_jax.training import config_validation
from mixer_jax.training import cost
from mixer_jax.training import data_checks
from mixer_jax.training import errors
from mixer_jax.training import evals
from mixer_jax.training import init_from_checks
from mixer_jax.training import optim
from mixer_jax.training import reporting
from mixer_jax.training import resume_checks
from mixer_jax.training import sharding
from mixer_jax.training import throughput
from mixer_jax.training import workdir_lock
from mixer_jax.weights import pretrained
from mixer_jax.weights import run_info

CHECKPOINT_DIR = checkpoints.CHECKPOINT_DIR


def num_train_steps_for(config, train_examples: int) -> int:
  """config.num_train_steps, or num_epochs over the data when it is -1."""
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return max(1, math.ceil(config.num_epochs * train_examples /
                          config.batch_size))


def create_mesh(config):
  """The device mesh of `config.mesh`; ConfigError when it does not fit."""
  try:
    return sharding.create_mesh(axes=config.mesh)
  except ValueError as e:
    raise config_validation.ConfigError(str(e)) from None


@dataclasses.dataclass(frozen=True)
class Run:
  """What a run is made of, before any state exists."""
  num_classes: int
  num_train_steps: int
  mesh: Any
  steps: compiled.RunFunctions  # Its model, shardings and jitted steps.


def build_run(config, info) -> Run:
  """Model, optimizer, mesh and step functions of `config` on `info`'s data."""
  num_train_steps = num_train_steps_for(config, info.train_examples)
  config_validation.check_schedule(config, num_train_steps)
  mesh = create_mesh(config)
  return Run(info.num_classes, num_train_steps, mesh, compiled.build(
      config, model_from_config.create_model(config, info.num_classes), mesh,
      tx=optim.create_optimizer(config, num_train_steps),
      num_train_steps=num_train_steps))


def check_state_fits(run) -> None:
  """ConfigError when the parameters and optimizer state exceed the memory.

  Counted from the abstract state, before compiling (the launch check
  compiles); CPU devices share the host's memory, so their sum counts.
  """
  devices = run.mesh.local_devices
  memory = cost.device_memory(devices[0])
  if memory is None:
    return
  limit, whose = memory
  shared = devices[0].platform == 'cpu'
  need = cost.state_bytes_per_device(run.steps.abstract_state) * (
      len(devices) if shared else 1)
  if need > limit:
    raise config_validation.ConfigError(
        f'The model\'s {models.count_params(run.steps.abstract_params):,} '
        f'parameters and their optimizer state need {need / 2**30:,.1f} GiB'
        f'{"" if shared else " per device"}, more than the '
        f'{limit / 2**30:,.1f} GiB of memory of {whose}: use a smaller model'
        f'{"" if shared else ", more devices or --config.sharding=fsdp"}. '
        'Nothing was written.')


def _resolve_init_from(config, checkpoint_dir: str):
  """`init_from_checks.resolve_init_from`, saying a derived tokens_mlp_dim."""
  resuming = config.resume_step >= 0 or resume_checks.has_saved_steps(
      checkpoint_dir)
  resolved = init_from_checks.resolve_init_from(config, resuming=resuming)
  if resolved is not config:
    reporting.log_and_print(
        f'model.tokens_mlp_dim={resolved.model.tokens_mlp_dim} from '
        f'{config.init_from} at image_size {config.image_size} (K^2 * D_S, '
        'paper Appendix C).')
  return resolved


# SIGTERM/SIGINT from the start (compilation, restore) stop the run cleanly.
@preemption.watch_preemption()
def train_and_evaluate(config, workdir: str) -> Dict[str, Any]:
  """Trains `config` in `workdir` (resuming if possible); the summary dict.

  A workdir already at its last step is left as it is (`already_finished`).
  """
  start_time = time.time()
  if not str(workdir or '').strip():  # '' would train into the current dir.
    raise config_validation.ConfigError(
        f'workdir={workdir!r}: pass a directory for checkpoints and logs, '
        'e.g. --workdir=/tmp/run.')
  config_validation.validate_config(config, num_devices=jax.device_count(),
                                    num_processes=jax.process_count())
  checkpoint_dir = os.path.join(workdir, CHECKPOINT_DIR)
  config = _resolve_init_from(config, checkpoint_dir)
  reporting.log_and_print(f'Checking the data ({config.dataset})...')
  run = build_run(config, data_checks.checked_dataset_info(config))
  check_state_fits(run)

  # Locked before the checkpointer, which removes unfinished saves, opens.
  # A refused or finished start leaves the workdir as it was.
  lock = workdir_lock.acquire(workdir)
  checkpointer, leave = None, True
  try:
    resume_checks.check_schedule_unchanged(config, workdir, checkpoint_dir,
                                           run.num_train_steps)
    checkpointer = checkpoints.Checkpointer(
        checkpoint_dir, keep=config.keep_checkpoints,
        keep_best=config.keep_best_checkpoint,
        fingerprint=fingerprint.model_fingerprint(config, run.num_classes))
    reporting.log_and_print(
        f'Mixer {config.model.variant}: '
        f'{models.count_params(run.steps.abstract_state.params):,} '
        f'parameters, {run.num_classes} classes; {run.num_train_steps} steps '
        f'of batch {config.batch_size} on {jax.device_count()} device(s), '
        f'{jax.process_count()} process(es); workdir {workdir}')
    state, extra = _restore_or_init(config, workdir, checkpointer, run)
    leave = extra.get('step') == run.num_train_steps
  finally:
    if leave:  # Refused, or finished.
      if checkpointer is not None:
        checkpointer.close()
      workdir_lock.release(lock, refused=True)
  if leave:
    return _already_finished(workdir, run.num_train_steps)
  if jax.process_index() == 0:  # Makes the workdir a checkpoint for predict.
    run_info.save_run_info(workdir, config, run.num_classes)
  writer = reporting.create_writer(workdir, int(extra.get('step', 0)))
  try:
    return _train(config, workdir, run, state, extra, checkpointer, writer,
                  start_time)
  finally:
    writer.close()
    checkpointer.close()
    workdir_lock.release(lock)


def _restore_or_init(config, workdir, checkpointer, run):
  """(state, checkpoint extra or {}) to train from, in this order:

  1. `config.resume_step=K`, the first time: step K is restored and the
     newer steps are set aside; the marker `workdir/resume_step_K.applied`
     then makes later starts (the same command after a preemption) skip
     this (delete it to fall back to K again).
  2. the newest checkpoint of the workdir;
  3. a fresh initialisation, with the parameters of `config.init_from` when
     it is set.
  """
  resume_step = config.resume_step if config.resume_step >= 0 else None
  marker = epath.Path(workdir) / f'resume_step_{resume_step}.applied'
  if resume_step is not None and marker.exists():
    logging.info('resume_step=%d was applied before (%s); resuming from the '
                 'newest checkpoint.', resume_step, marker)
    resume_step = None
  if resume_step is not None or checkpointer.latest_step() is not None:
    state, extra = checkpointer.restore(run.steps.abstract_state,
                                        step=resume_step)
    if resume_step is not None:
      checkpointer.set_aside_steps_after(resume_step)
      if jax.process_index() == 0:
        marker.write_text(f'Resumed from step {resume_step} and set the '
                          'newer steps aside; later starts resume from the '
                          'newest checkpoint. Delete this file to fall back '
                          f'to step {resume_step} again.\n')
    if extra['step'] < run.num_train_steps:  # Else it says it finished.
      reporting.log_and_print(f'Resumed from step {int(extra["step"])} in '
                              f'{checkpointer.directory}.')
    return state, extra
  state = run.steps.init_fn(jax.random.PRNGKey(config.seed))
  if config.init_from:
    params = pretrained.init_from_checkpoint(
        config.init_from, sharding.to_host(state.params))
    state = state.replace(params=sharding.put(params,
                                              run.steps.params_sharding))
    logging.info('Initialised parameters from %s.', config.init_from)
  return state, {}


def _already_finished(workdir: str, num_train_steps: int) -> Dict[str, Any]:
  reporting.log_and_print(
      f'{workdir} already finished at step {num_train_steps} of '
      f'{num_train_steps}; nothing to train. Evaluate it (python -m '
      f'mixer_jax.evaluate --checkpoint={workdir}), train longer with '
      '--config.num_train_steps --config.allow_changed_schedule=True, or '
      'choose another --workdir.')
  return {'steps': num_train_steps, 'num_train_steps': num_train_steps,
          'start_step': num_train_steps, 'preempted': False,
          'already_finished': True, 'last_checkpoint_step': num_train_steps,
          'workdir': str(workdir),
          'checkpoint_dir': os.path.join(workdir, CHECKPOINT_DIR)}


def _train(config, workdir, run, state, extra, checkpointer, writer,
           start_time):
  """The step loop from the restored state; returns the summary dict."""
  step = start_step = int(sharding.to_host(state.step))
  if step == 0:
    writer.write_hparams({k: v for k, v in config.to_dict().items()
                          if not isinstance(v, dict)})
  evaluations = evals.Evaluations(
      config, run.steps, run.num_train_steps,
      stop_requested=lambda: checkpointer.preemption_signal is not None,
      best=extra.get('best_eval_accuracy'), last=extra.get('last_eval'))
  last_saved = step if extra else None
  progress = throughput.Progress(
      step, run.num_train_steps, config.batch_size, num_devices=run.mesh.size,
      flops_per_image=3 * models.flops_per_image(run.steps.model,
                                                 config.image_size),
      peak=throughput.peak_tflops(run.mesh.devices.flat[0].device_kind,
                                  config.model.dtype))
  pending, history, speeds = [], [], []
  profile = _Profile(config, workdir)
  reporting.log_and_print('Compiling the train step (the first step takes '
                          'longer)...')
  batches = throughput.InputTimer(sharding.prefetch(
      input_pipeline.train_dataset(config, start_step=step).as_numpy_iterator(),
      run.mesh, config.prefetch_batches))
  preempted = checkpointer.reached_preemption(step)  # Installs the handlers.
  if extra.get('pending_evals') and not preempted:
    reporting.log_and_print(f'step {step}: running the evaluations a stop '
                            'request interrupted.')
    preempted = bool(evaluations.run(extra['pending_evals'], state, step,
                                     writer))
  while step < run.num_train_steps and not preempted:
    profile.at(step, state)
    state, metrics = run.steps.train_step(state, next(batches))
    step += 1
    pending.append((step, metrics))
    if step == start_step + 1:  # Keep compilation out of steps/s and ETA.
      jax.block_until_ready(metrics)
      preemption.training_started()  # A stop request now saves this step.
      reporting.log_and_print(f'First step (with compilation) took '
                              f'{progress.restart(step):.1f} s.')
      batches.take_wait()
    preempted = checkpointer.reached_preemption(step)
    last = step == run.num_train_steps
    log = step % config.log_every_steps == 0 or last
    due = evaluations.due(step)
    save = step % config.checkpoint_every_steps == 0 or last or preempted
    if not (log or due or save):
      continue
    # Fetching the metrics waits for the step: only at these points.
    history += _fetch_finite(pending, checkpointer.directory, last_saved)
    pending = []
    if log:
      speeds.append(_log_train(step, history, progress, batches, writer))
      history = []
    progress.pause()
    # A stop request saves first; the restart runs the evaluations left.
    left = due if preempted else evaluations.run(due, state, step, writer)
    preempted = preempted or bool(left)
    if save or left or (evaluations.improved and config.keep_best_checkpoint):
      _save(checkpointer, step, state, evaluations, left, run.num_train_steps,
            main_eval_done=evals.MAIN_EVAL in set(due) - set(left))
      last_saved = step
    writer.flush()
    progress.resume()
  profile.close()
  checkpointer.wait_until_finished()
  if preempted:
    logging.warning('Stopped at step %d on request (%s); restart the same '
                    'command to resume.', step, checkpointer.preemption_signal)
  summary = _summary(workdir, run, evaluations, speeds, step=step,
                     start_step=start_step, preempted=preempted,
                     last_saved=last_saved, start_time=start_time)
  reporting.log_and_print(reporting.format_summary(summary))
  return summary


def _fetch_finite(pending, checkpoint_dir, last_saved):
  """[(step, host metrics)] of `pending`; NonFiniteLossError at a bad one."""
  fetched = [(s, {k: float(v) for k, v in sharding.to_host(m).items()})
             for s, m in pending]
  for step, metrics in fetched:
    bad = {k: v for k, v in metrics.items()
           if k in ('loss', 'grad_norm') and not math.isfinite(v)}
    if bad:
      raise errors.NonFiniteLossError(
          f'Training stopped: {", ".join(f"{k}={v}" for k, v in bad.items())}'
          f' at step {step}. That state was not saved; '
          + (f'the last good checkpoint is step {last_saved} in '
             f'{checkpoint_dir}' if last_saved is not None else
             'no checkpoint was saved before (a restart begins at step 0)')
          + '. Lower config.learning_rate, raise warmup_steps or enable '
          'grad_clip_norm, then restart (it resumes from the last good '
          'checkpoint, if any).')
  return fetched


def _log_train(step, history, progress, batches, writer):
  """Writes and prints the mean train metrics of `history` and the speed."""
  speed = progress.measure(step, input_wait=batches.take_wait())
  means = {f'train_{k}': float(np.mean([m[k] for _, m in history]))
           for k in history[-1][1]}
  writer.write_scalars(step, {**means, **speed})
  reporting.log_and_print(progress.line(step, speed,
                                        {'loss': means['train_loss']}))
  return speed


def _save(checkpointer, step, state, evaluations, left, num_train_steps, *,
          main_eval_done):
  """Saves `step`, with the evaluations a stop request left (`left`)."""
  checkpointer.save(
      step, state,
      metrics=({'eval_accuracy': evaluations.last['eval_accuracy']}
               if main_eval_done else None),
      extra={'best_eval_accuracy': evaluations.best,
             'last_eval': evaluations.last,
             'num_train_steps': num_train_steps, 'pending_evals': left})


class _Profile:
  """Traces config.profile_steps steps from config.profile_start_step.

  Not clu's Profile: its first call never starts a trace (so a run resumed
  at profile_start_step would not profile), it keeps tracing at least 3 s
  and does not stop a trace open when the loop ends.
  """

  def __init__(self, config, workdir):
    on = config.profile_steps and jax.process_index() == 0
    self.start = config.profile_start_step if on else -1
    self.stop = self.start + config.profile_steps
    self.directory = os.path.join(workdir, 'profile')
    self.tracing = False

  def at(self, step: int, state) -> None:
    """Called before each step runs."""
    if step == self.start:
      jax.profiler.start_trace(self.directory)
      self.tracing = True
    elif self.tracing and step >= self.stop:
      jax.block_until_ready(state)
      self.close()

  def close(self) -> None:
    if self.tracing:
      jax.profiler.stop_trace()
      self.tracing = False


def _summary(workdir, run, evaluations, speeds, *, step, start_step,
             preempted, last_saved, start_time) -> Dict[str, Any]:
  return {
      'steps': step, 'num_train_steps': run.num_train_steps,
      'start_step': start_step, 'preempted': bool(preempted),
      'last_eval_accuracy': evaluations.last.get('eval_accuracy'),
      'last_eval_loss': evaluations.last.get('eval_loss'),
      'best_eval_accuracy': evaluations.best, **evaluations.accuracies,
      'last_checkpoint_step': last_saved,
      'wall_time_s': time.time() - start_time, 'workdir': str(workdir),
      'checkpoint_dir': os.path.join(workdir, CHECKPOINT_DIR),
      'metrics_file': os.path.join(workdir, reporting.METRICS_FILE),
      # Means over the logged intervals (compilation, evals and saves out).
      **{key: float(np.mean([s[key] for s in speeds]))
         for key in ('images_per_sec', 'tflops_per_device', 'mfu',
                     'input_wait_share') if speeds and key in speeds[0]},
  }
