"""The training job: `train_and_evaluate(config, workdir)`.

It validates the config, builds the model, optimizer and data, resumes from
the newest checkpoint in `workdir/checkpoints` when there is one (else
initialises, optionally from `config.init_from`), then trains with one
jitted step over a device mesh (see `sharding.py`), evaluating, logging and
checkpointing periodically. A run stopped by SIGTERM/SIGINT saves its
current step and can be restarted with the same command; it then continues
exactly (same data order and random numbers). A non-finite loss stops the
run, naming the step, without saving the bad state.
"""

import dataclasses
import math
import os
import time
from typing import Any, Dict, Optional

from absl import logging
from etils import epath
import jax
import numpy as np
import optax

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
from mixer_jax.weights import run_info
from mixer_jax.weights import pretrained

CHECKPOINT_DIR = checkpoints.CHECKPOINT_DIR


def num_train_steps_for(config, train_examples: int) -> int:
  """config.num_train_steps, or num_epochs over the data when it is -1."""
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return max(1, math.ceil(config.num_epochs * train_examples /
                          config.batch_size))


def make_step_functions(config, model, tx, mesh, num_train_steps: int):
  """The run's jitted functions over `mesh` (`compiled.build`).

  Returns:
    compiled.RunFunctions: init_fn(rng) makes a TrainState placed by the
    state shardings; abstract_state is its ShapeDtypeStruct tree with
    shardings (the restore target); train_step, eval_step and the steps of
    config.evals; train_traces.count is how often the train step compiled.
  """
  return compiled.build(config, model, mesh, tx=tx,
                        num_train_steps=num_train_steps)


def create_mesh(config):
  """The device mesh of `config.mesh`; ConfigError when it does not fit."""
  try:
    return sharding.create_mesh(axes=config.mesh)
  except ValueError as e:
    raise config_validation.ConfigError(str(e)) from None


def _check_finite(history, checkpoint_dir, last_saved):
  """Raises NonFiniteLossError at the first step with a bad loss or gradient."""
  for step, metrics in history:
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


def _mean_metrics(history) -> Dict[str, float]:
  keys = history[-1][1].keys()
  return {f'train_{k}': float(np.mean([m[k] for _, m in history]))
          for k in keys}


# SIGTERM/SIGINT from the start (compilation, restore) stop the run cleanly.
@preemption.watch_preemption()
def train_and_evaluate(config, workdir: str) -> Dict[str, Any]:
  """Trains `config` in `workdir` (resuming if possible) and evaluates.

  Args:
    config: a ConfigDict from configs/ (see configs/common.py).
    workdir: directory for checkpoints, TensorBoard events, metrics.jsonl.

  Returns:
    Summary dict: steps, best/last eval accuracy and loss, the accuracy of
    every other eval, whether the run was preempted, wall time and where
    everything was written. A workdir whose newest checkpoint is the last
    step is left as it is (`already_finished` in the summary).

  Raises:
    config_validation.ConfigError: invalid config, a batch larger than the
      training split, or parameters and optimizer state larger than the
      memory (before anything is compiled or written).
    errors.NonFiniteLossError: the loss became NaN/inf (names the step).
    checkpoint_checks.CheckpointError: unusable workdir or checkpoint.
    Errors of `config.init_from` (ConfigError when it does not fit the
    model, CheckpointNotFoundError, PretrainedError) are raised before
    anything is compiled or written.
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
  # Splits, class count and config.evals data: all checked before step 1.
  reporting.log_and_print(f'Checking the data ({config.dataset})...')
  run = build_run(config, data_checks.checked_dataset_info(config))
  check_state_fits(run)

  # One running job per workdir: refuses a second start (before the
  # checkpointer, which removes unfinished saves, is opened). A start
  # refused after this point (another model, another schedule) leaves the
  # workdir as it was: run_info.json and the writers come after the restore.
  lock = workdir_lock.acquire(workdir)
  checkpointer = None
  try:
    resume_checks.check_schedule_unchanged(config, workdir, checkpoint_dir,
                                           run.num_train_steps)
    if _finished(config, workdir, checkpoint_dir, run.num_classes,
                 run.num_train_steps):
      workdir_lock.release(lock, refused=True)
      n = run.num_train_steps
      return {'steps': n, 'num_train_steps': n, 'start_step': n,
              'preempted': False, 'already_finished': True,
              'last_checkpoint_step': n, 'workdir': str(workdir),
              'checkpoint_dir': checkpoint_dir}
    checkpointer = _checkpointer(config, workdir, run.num_classes)
    reporting.log_and_print(
        f'Mixer {config.model.variant}: '
        f'{models.count_params(run.steps.abstract_state.params):,} '
        f'parameters, {run.num_classes} classes; {run.num_train_steps} steps '
        f'of batch {config.batch_size} on {jax.device_count()} device(s), '
        f'{jax.process_count()} process(es); workdir {workdir}')
    state, extra = _restore_or_init(config, workdir, checkpointer,
                                    run.steps.init_fn,
                                    run.steps.abstract_state)
  except BaseException:
    if checkpointer is not None:
      checkpointer.close()
    workdir_lock.release(lock, refused=True)
    raise
  if jax.process_index() == 0:  # Makes the workdir a checkpoint for predict.
    run_info.save_run_info(workdir, config, run.num_classes)
  writer = reporting.create_writer(workdir)
  reporting.log_and_print('Compiling the train step (the first step takes '
                          'longer)...')
  try:
    return _train_loop(
        config=config, workdir=workdir, run=run, state=state, extra=extra,
        checkpointer=checkpointer, writer=writer, start_time=start_time,
        evaluations=evals.Evaluations(
            config, run.steps, run.num_train_steps,
            stop_requested=lambda: checkpointer.preemption_signal is not None))
  finally:
    writer.close()
    checkpointer.close()
    workdir_lock.release(lock)


def check_state_fits(run) -> None:
  """ConfigError when the parameters and optimizer state exceed the memory.

  An analytic count (`cost.state_bytes_per_device` of the abstract state,
  under the run's sharding), made before anything is compiled or written;
  the launch check (--check_only) compiles the whole run. The CPU devices
  of a host share its memory, so there their sum counts.
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


def _finished(config, workdir: str, checkpoint_dir: str, num_classes: int,
              num_train_steps: int) -> bool:
  """Whether the newest checkpoint is the run's last step (says so).

  CheckpointError when it was written for another model.
  """
  if config.resume_step >= 0 and not _resume_marker(
      workdir, config.resume_step).exists():
    return False  # Goes back to resume_step first.
  if not resume_checks.has_saved_steps(checkpoint_dir):
    return False
  reader = checkpoints.Checkpointer(
      checkpoint_dir, keep=1, keep_best=False, read_only=True,
      fingerprint=fingerprint.model_fingerprint(config, num_classes))
  try:
    if reader.latest_step() != num_train_steps:
      return False
    step = int(reader.read_extra()['step'])
  finally:
    reader.close()
  reporting.log_and_print(
      f'{workdir} already finished at step {step} of {num_train_steps}; '
      f'nothing to train. Evaluate it (python -m mixer_jax.evaluate '
      f'--checkpoint={workdir}), train longer with --config.num_train_steps '
      '--config.allow_changed_schedule=True, or choose another --workdir.')
  return True


@dataclasses.dataclass(frozen=True)
class Run:
  """What `train_and_evaluate` and `load_train_state` both build."""
  num_classes: int
  num_train_steps: int
  model: models.MlpMixer
  tx: optax.GradientTransformation
  mesh: Any
  steps: compiled.RunFunctions


def build_run(config, info) -> Run:
  """Model, optimizer, mesh and step functions of `config` on `info`'s data."""
  num_classes = info.num_classes
  num_train_steps = num_train_steps_for(config, info.train_examples)
  config_validation.check_schedule(config, num_train_steps)
  model = model_from_config.create_model(config, num_classes)
  tx = optim.create_optimizer(config, num_train_steps)
  mesh = create_mesh(config)
  return Run(num_classes, num_train_steps, model, tx, mesh,
             make_step_functions(config, model, tx, mesh, num_train_steps))


def _checkpointer(config, workdir: str, num_classes: int):
  return checkpoints.Checkpointer(
      os.path.join(workdir, CHECKPOINT_DIR), keep=config.keep_checkpoints,
      keep_best=config.keep_best_checkpoint,
      fingerprint=fingerprint.model_fingerprint(config, num_classes))


def _resolve_init_from(config, checkpoint_dir: str):
  """Checks config.init_from before anything is compiled or written.

  With a resolution change and `model.tokens_mlp_dim` None, returns a copy
  of the config using K^2 * D_S of the checkpoint (paper, Appendix C).
  """
  resuming = config.resume_step >= 0 or resume_checks.has_saved_steps(
      checkpoint_dir)
  resolved = init_from_checks.resolve_init_from(config, resuming=resuming)
  if resolved is not config:
    reporting.log_and_print(
        f'model.tokens_mlp_dim={resolved.model.tokens_mlp_dim} from '
        f'{config.init_from} at image_size {config.image_size} (K^2 * D_S, '
        'paper Appendix C).')
  return resolved


def load_train_state(config, workdir: str, step: Optional[int] = None):
  """Restores the TrainState that `train_and_evaluate` saved in `workdir`.

  Args:
    config: the run's config (model, optimizer and data fields must match).
    workdir: the run's workdir.
    step: the step to load; default the latest.

  Returns:
    (state, extra): the replicated TrainState and the checkpoint's JSON dict.
  """
  config = init_from_checks.resolve_init_from(config, resuming=True)
  run = build_run(config, input_pipeline.dataset_info(config))
  checkpointer = _checkpointer(config, workdir, run.num_classes)
  try:
    return checkpointer.restore(run.steps.abstract_state, step=step)
  finally:
    checkpointer.close()


def _resume_marker(workdir: str, step: int) -> epath.Path:
  return epath.Path(workdir) / f'resume_step_{step}.applied'


def _restore_or_init(config, workdir, checkpointer, init_fn, abstract_state):
  """Latest (or config.resume_step) checkpoint, else init / init_from.

  `config.resume_step=K` applies once per workdir: the first start restores
  step K, sets the newer steps aside and writes the marker file
  `workdir/resume_step_K.applied`. Later starts with the same flag (e.g.
  the same command after a preemption) see the marker and resume from the
  newest checkpoint, keeping the progress made since K. Delete the marker to
  fall back to K again.
  """
  resume_step = config.resume_step if config.resume_step >= 0 else None
  marker = None if resume_step is None else _resume_marker(workdir,
                                                           resume_step)
  if marker is not None and marker.exists():
    logging.info('resume_step=%d was applied before (%s); resuming from the '
                 'newest checkpoint.', resume_step, marker)
    resume_step = None
  if checkpointer.latest_step() is not None or resume_step is not None:
    state, extra = checkpointer.restore(abstract_state, step=resume_step)
    if resume_step is not None:
      checkpointer.set_aside_steps_after(resume_step)
      if jax.process_index() == 0:
        marker.write_text(f'Resumed from step {resume_step} and set the '
                          'newer steps aside; later starts resume from the '
                          'newest checkpoint. Delete this file to fall back '
                          f'to step {resume_step} again.\n')
    reporting.log_and_print(f'Resumed from step {int(extra["step"])} in '
                            f'{checkpointer.directory}.')
    return state, extra
  state = init_fn(jax.random.PRNGKey(config.seed))
  if config.init_from:
    params = pretrained.init_from_checkpoint(
        config.init_from, sharding.to_host(state.params))
    shardings = jax.tree.map(lambda x: x.sharding, state.params)
    state = state.replace(params=sharding.put(params, shardings))
    logging.info('Initialised parameters from %s.', config.init_from)
  return state, {}


MAIN_EVAL = ''  # The eval of config.eval_split, among config.evals' names.


def _run_evaluations(names, *, step, params, config, run, evaluations,
                     writer, best, last_eval, results, ema_params=None):
  """Runs the main eval (MAIN_EVAL) and the config.evals entries `names`.

  Each one's metrics are written as it finishes. A stop request (see
  `evals.Evaluations.stop_requested`) abandons the rest. With `ema_params`
  (config.ema_decay > 0) the main eval also scores the EMA weights, as
  `ema/eval_accuracy` and `ema/eval_loss`; best and keep_best follow the
  trained weights. The accuracies of the EMA and config.evals entries go
  into `results` too (the summary lists them).

  Returns:
    (names not run, best eval accuracy, last main eval, whether the main
    eval improved on the best).
  """
  improved = False
  stop_requested = (evaluations.stop_requested if evaluations is not None
                    else None)
  for i, name in enumerate(names):
    if name == MAIN_EVAL:
      result = evals.evaluate_dataset(
          run.steps.eval_step, params,
          input_pipeline.eval_dataset(config).as_numpy_iterator(), run.mesh,
          prefetch=config.prefetch_batches, stop_requested=stop_requested)
      if result is None:
        return names[i:], best, last_eval, improved
      last_eval = {'eval_accuracy': result['accuracy'],
                   'eval_loss': result['loss'],
                   'eval_examples': result['examples']}
      improved = best is None or last_eval['eval_accuracy'] > best
      best = max(best or 0.0, last_eval['eval_accuracy'])
      writer.write_scalars(step, last_eval)
      reporting.log_and_print(
          f'step {step}: eval accuracy {last_eval["eval_accuracy"]:.4f}, '
          f'loss {last_eval["eval_loss"]:.4f} (best {best:.4f})'
          + evals.nan_note(result['nan_rows']))
      if ema_params is not None:
        ema = evals.evaluate_dataset(
            run.steps.eval_step, ema_params,
            input_pipeline.eval_dataset(config).as_numpy_iterator(),
            run.mesh, prefetch=config.prefetch_batches,
            stop_requested=stop_requested)
        if ema is None:
          return names[i + 1:], best, last_eval, improved
        results['ema/eval_accuracy'] = ema['accuracy']
        writer.write_scalars(step, {'ema/eval_accuracy': ema['accuracy'],
                                    'ema/eval_loss': ema['loss']})
        reporting.log_and_print(
            f'step {step}: EMA eval accuracy {ema["accuracy"]:.4f}, '
            f'loss {ema["loss"]:.4f}')
      continue
    more = evaluations.run_one(name, params)  # `<name>/accuracy` etc.
    if more is None:
      return names[i:], best, last_eval, improved
    writer.write_scalars(step, more)
    accuracies = {k: v for k, v in more.items() if 'accuracy' in k}
    results.update(accuracies)
    reporting.log_and_print(f'step {step}: ' + ', '.join(
        f'{k} {v:.4f}' for k, v in accuracies.items())
        + evals.nan_note(more.get(f'{name}/nan_rows', 0)))
  return [], best, last_eval, improved


def _train_loop(*, config, workdir, run: Run, state, extra, checkpointer,
                writer, start_time: float,
                evaluations: Optional[evals.Evaluations] = None):
  """The step loop; returns the summary dict.

  `evaluations` runs config.evals when due.
  """
  step = int(sharding.to_host(state.step))
  # Records of steps after the resumed one (and a torn line) are from a
  # killed run: dropped, so each step is in metrics.jsonl once.
  reporting.rewind(writer, step)
  if step == 0:
    writer.write_hparams({k: v for k, v in config.to_dict().items()
                          if not isinstance(v, dict)})
  train_batches = input_pipeline.train_dataset(config, start_step=step)
  # A background thread reads the host batches and places them on the
  # devices, so this thread only dispatches steps (asynchronously) and the
  # devices never wait for host input work. The timer counts what this
  # thread waits for a placed batch: the input share of the wall time.
  prefetcher = sharding.prefetch(train_batches.as_numpy_iterator(),
                                 run.mesh, config.prefetch_batches)
  batches = input_timer = throughput.InputTimer(prefetcher)
  try:
    return _run_steps(
        config=config, workdir=workdir, run=run, state=state, extra=extra,
        checkpointer=checkpointer, writer=writer, start_time=start_time,
        evaluations=evaluations, batches=batches, input_timer=input_timer)
  finally:
    prefetcher.close()


def _run_steps(*, config, workdir, run: Run, state, extra, checkpointer,
               writer, start_time: float, evaluations, batches, input_timer):
  """`_train_loop` once its input runs: the steps, evals and saves."""
  mesh, num_train_steps = run.mesh, run.num_train_steps
  p_train_step = run.steps.train_step
  step = start_step = int(sharding.to_host(state.step))
  best = extra.get('best_eval_accuracy')
  last_eval = extra.get('last_eval', {})
  last_saved = step if extra else None
  flops_per_image = throughput.train_flops_per_image(run.steps.model,
                                                     config.image_size)
  # Not clu's ReportProgress: its steps/s counts eval, checkpoint and compile
  # time, while steps/s and ETA here are of training alone (pause/resume).
  progress = reporting.Progress(step, num_train_steps, config.batch_size)
  history, pending, speeds = [], [], []
  results = {}  # The latest accuracy of every other eval this process ran.
  preempted = checkpointer.reached_preemption(step)  # Installs the handlers.
  if extra.get('pending_evals') and not preempted:
    # The evaluations of the saved step that a stop request interrupted.
    reporting.log_and_print(f'step {step}: running the evaluations a stop '
                            'request interrupted.')
    left, best, last_eval, _ = _run_evaluations(
        extra['pending_evals'], step=step, params=state.params,
        config=config, run=run, evaluations=evaluations, writer=writer,
        best=best, last_eval=last_eval, results=results,
        ema_params=state.ema_params)
    preempted = bool(left)
  # Not clu's Profile: its first call never starts a trace (so a run resumed
  # at profile_start_step would not profile), it keeps tracing at least 3 s
  # and does not stop a trace open when the loop ends.
  profiling = False
  while step < num_train_steps and not preempted:
    if (config.profile_steps and step == config.profile_start_step and
        jax.process_index() == 0):
      jax.profiler.start_trace(os.path.join(workdir, 'profile'))
      profiling = True
    state, metrics = p_train_step(state, next(batches))
    step += 1
    pending.append((step, metrics))
    if step == start_step + 1:  # Keep compilation out of steps/s and ETA.
      jax.block_until_ready(metrics)
      preemption.training_started()  # A stop request now saves this step.
      reporting.log_and_print(f'First step (with compilation) took '
                              f'{progress.restart(step):.1f} s.')
      input_timer.take_wait()
    if profiling and step >= config.profile_start_step + config.profile_steps:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      profiling = False
    preempted = checkpointer.reached_preemption(step)
    last = step == num_train_steps
    do_eval = step % config.eval_every_steps == 0 or last
    do_save = step % config.checkpoint_every_steps == 0 or last or preempted
    due = evaluations.due(step) if evaluations is not None else []
    if not (step % config.log_every_steps == 0 or do_eval or do_save or due):
      continue
    # Fetching the metrics waits for the step; done only at these points.
    fetched = [(s, {k: float(v) for k, v in sharding.to_host(m).items()})
               for s, m in pending]
    pending = []
    _check_finite(fetched, checkpoint_dir=checkpointer.directory,
                  last_saved=last_saved)
    history += fetched
    if step % config.log_every_steps == 0 or last:
      speed = progress.measure(step, input_wait=input_timer.take_wait())
      speed.update(throughput.speed_metrics(
          speed['images_per_sec'], flops_per_image=flops_per_image,
          num_devices=mesh.size, device_kind=mesh.devices.flat[0].device_kind,
          dtype=config.model.dtype))
      speeds.append(speed)
      train_metrics = _mean_metrics(history)
      history = []
      writer.write_scalars(step, {**train_metrics, **speed})
      reporting.log_and_print(progress.line(
          step, speed, {'loss': train_metrics['train_loss']}))
    progress.pause()
    names = ([MAIN_EVAL] if do_eval else []) + list(due)
    save_metrics, improved, left = None, False, names
    if not preempted:  # A stop request saves first; the restart evaluates.
      left, best, last_eval, improved = _run_evaluations(
          names, step=step, params=state.params, config=config, run=run,
          evaluations=evaluations, writer=writer, best=best,
          last_eval=last_eval, results=results, ema_params=state.ema_params)
    if left:  # Stopped during the evaluations: save now, evaluate later.
      preempted = do_save = True
    elif do_eval:
      save_metrics = {'eval_accuracy': last_eval['eval_accuracy']}
    # keep_best: also save a step that is the best so far (only those).
    do_save = do_save or (improved and config.keep_best_checkpoint)
    if do_save:
      checkpointer.save(step, state, metrics=save_metrics, extra={
          'best_eval_accuracy': best,
          'last_eval': last_eval, 'num_train_steps': num_train_steps,
          'pending_evals': left})
      last_saved = step
    writer.flush()
    progress.resume()
  if profiling:
    jax.profiler.stop_trace()
  checkpointer.wait_until_finished()
  summary = {
      'steps': step, 'num_train_steps': num_train_steps,
      'start_step': start_step, 'preempted': bool(preempted),
      'last_eval_accuracy': last_eval.get('eval_accuracy'),
      'last_eval_loss': last_eval.get('eval_loss'),
      'best_eval_accuracy': best, **results,
      'last_checkpoint_step': last_saved,
      'wall_time_s': time.time() - start_time, 'workdir': str(workdir),
      # Paths as the workdir was given.
      'checkpoint_dir': os.path.join(workdir, CHECKPOINT_DIR),
      'metrics_file': os.path.join(workdir, reporting.METRICS_FILE),
      # 1 unless something made the step recompile (shapes, dtypes, ...).
      'train_step_compilations': run.steps.train_traces.count,
      # Means over the logged intervals (compilation, evals and saves out).
      **{key: float(np.mean([s[key] for s in speeds]))
         for key in ('images_per_sec', 'tflops_per_device', 'mfu',
                     'input_wait_share') if speeds and key in speeds[0]},
  }
  if preempted:
    logging.warning('Stopped at step %d on request (%s); restart the same '
                    'command to resume.', step, checkpointer.preemption_signal)
  reporting.log_and_print(reporting.format_summary(summary))
  return summary
