"""Trains and evaluates an MLP-Mixer: `python -m mixer_jax.train`.

  python -m mixer_jax.train --config=configs/quickstart.py --workdir=/tmp/qs
  python -m mixer_jax.train --config=configs/b16.py --workdir=gs://b/run \
      --config.batch_size=1024

`train_and_evaluate(config, workdir)` runs the whole job: it validates the
config, builds the model, optimizer and data, resumes from the newest
checkpoint in `workdir/checkpoints` when there is one (else initialises,
optionally from `config.init_from`), then trains with one jitted step over a
device mesh (see `sharding.py`), evaluating, logging and checkpointing
periodically. A run stopped by SIGTERM/SIGINT saves its current step and can
be restarted with the same command; it then continues exactly (same data
order and random numbers). A non-finite loss stops the run, naming the step,
without saving the bad state.
"""

import functools
import math
import os
import time
from typing import Any, Dict, Optional

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from mixer_jax.weights import any_checkpoint
from mixer_jax.checkpointing import checkpoints
from mixer_jax.training import config_loading
from mixer_jax.training import config_validation
from mixer_jax.data import data_checks
from mixer_jax.training import evals
from mixer_jax.data import input_pipeline
from mixer_jax import models
from mixer_jax.weights import official_format
from mixer_jax.training import optim
from mixer_jax.weights import pretrained
from mixer_jax.weights import registry
from mixer_jax.training import reporting
from mixer_jax.training import sharding
from mixer_jax.training import train_steps
from mixer_jax.training import workdir_lock
from mixer_jax.data.datasets import sources

# The public step API lives in train_steps.py; these names are the contract.
TrainState = train_steps.TrainState
create_model = train_steps.create_model
create_train_state = train_steps.create_train_state
train_step = train_steps.train_step
eval_step = train_steps.eval_step

CHECKPOINT_DIR = 'checkpoints'
FLAGS = flags.FLAGS


class NonFiniteLossError(FloatingPointError):
  """The training loss or gradient became NaN or infinite."""


# Failures whose message says what to do: the programs print it without a
# traceback. Anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (config_validation.ConfigError, checkpoints.CheckpointError,
                   NonFiniteLossError, sources.DatasetUnavailableError,
                   sources.BadImagesError, official_format.PretrainedError,
                   registry.CheckpointNotFoundError)


def num_train_steps_for(config, train_examples: int) -> int:
  """config.num_train_steps, or num_epochs over the data when it is -1."""
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return max(1, math.ceil(config.num_epochs * train_examples /
                          config.batch_size))


def make_step_functions(config, model, tx, mesh, num_train_steps: int):
  """Jits train and eval steps over `mesh` and the abstract sharded state.

  The batch is split over the mesh's 'data' axis; parameters and optimizer
  state are placed by `config.sharding` (see `sharding.state_shardings`).

  Returns:
    (init_fn, p_train_step, p_eval_step, abstract_state): init_fn(rng) makes
    a TrainState placed by those shardings; abstract_state is its
    ShapeDtypeStruct tree with shardings (the restore target).
  """
  replicated = sharding.replicated(mesh)
  data = sharding.batch_sharding(mesh)
  init = functools.partial(create_train_state, model, tx,
                           image_size=config.image_size)
  shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
  state_sharding = sharding.state_shardings(shapes, mesh, config.sharding)
  abstract_state = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      shapes, state_sharding)
  init_fn = jax.jit(init, out_shardings=state_sharding)
  step_fn = functools.partial(
      train_step, loss=config.loss, label_smoothing=config.label_smoothing,
      grad_accum_steps=config.grad_accum_steps,
      mixup_alpha=config.pp.mixup_alpha, mixup_prob=config.pp.mixup_prob,
      learning_rate_fn=optim.learning_rate_fn(config, num_train_steps))
  p_train_step = jax.jit(step_fn, in_shardings=(state_sharding, data),
                         out_shardings=(state_sharding, replicated),
                         donate_argnums=(0,))
  p_eval_step = jax.jit(
      functools.partial(eval_step, apply_fn=model.apply, loss=config.loss),
      in_shardings=(state_sharding.params, data), out_shardings=replicated)
  return init_fn, p_train_step, p_eval_step, abstract_state


def evaluate(p_eval_step, params, eval_batches, mesh) -> Dict[str, float]:
  """Top-1 accuracy and mean loss over one pass of the eval data."""
  totals = None
  for batch in sharding.prefetch(eval_batches, mesh):
    sums = p_eval_step(params, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise ValueError('The eval data set yielded no batch; check eval_split.')
  totals = sharding.to_host(totals)
  count = max(float(totals['count']), 1.0)
  return {'eval_accuracy': float(totals['correct']) / count,
          'eval_loss': float(totals['loss_sum']) / count,
          'eval_examples': int(totals['count'])}


def _check_finite(history, checkpoint_dir, last_saved):
  """Raises NonFiniteLossError at the first step with a bad loss or gradient."""
  for step, metrics in history:
    bad = {k: v for k, v in metrics.items()
           if k in ('loss', 'grad_norm') and not math.isfinite(v)}
    if bad:
      raise NonFiniteLossError(
          f'Training stopped: {", ".join(f"{k}={v}" for k, v in bad.items())}'
          f' at step {step}. That state was not saved; the last good '
          f'checkpoint is step {last_saved} in {checkpoint_dir}. Lower '
          'config.learning_rate, raise warmup_steps or enable grad_clip_norm, '
          'then restart (it resumes from that checkpoint).')


def _mean_metrics(history) -> Dict[str, float]:
  keys = history[-1][1].keys()
  return {f'train_{k}': float(np.mean([m[k] for _, m in history]))
          for k in keys}


# SIGTERM/SIGINT from the start (compilation, restore) stop the run cleanly.
@checkpoints.watch_preemption()
def train_and_evaluate(config, workdir: str) -> Dict[str, Any]:
  """Trains `config` in `workdir` (resuming if possible) and evaluates.

  Args:
    config: a ConfigDict from configs/ (see configs/common.py).
    workdir: directory for checkpoints, TensorBoard events, metrics.jsonl.

  Returns:
    Summary dict: steps, best/last eval accuracy and loss, whether the run
    was preempted, wall time and where everything was written.

  Raises:
    config_validation.ConfigError: invalid config (before any compilation).
    NonFiniteLossError: the loss became NaN/inf (names the step).
    checkpoints.CheckpointError: unusable workdir or checkpoint.
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
  mesh = sharding.create_mesh()
  # Splits, class count and config.evals data: all checked before step 1.
  info = data_checks.checked_dataset_info(config)
  num_classes = (info.num_classes if config.num_classes == -1
                 else config.num_classes)
  num_train_steps = num_train_steps_for(config, info.train_examples)
  config_validation.check_schedule(config, num_train_steps)
  model = create_model(config, num_classes)
  tx = optim.create_optimizer(config, num_train_steps)
  init_fn, p_train_step, p_eval_step, abstract_state = make_step_functions(
      config, model, tx, mesh, num_train_steps)

  # One running job per workdir: refuses a second start (before the
  # checkpointer, which removes unfinished saves, is opened).
  lock = workdir_lock.acquire(workdir)
  checkpointer = checkpoints.Checkpointer(
      checkpoint_dir, keep=config.keep_checkpoints,
      keep_best=config.keep_best_checkpoint,
      fingerprint=checkpoints.model_fingerprint(config, num_classes))
  if jax.process_index() == 0:  # Makes the workdir a checkpoint for predict.
    any_checkpoint.save_run_info(workdir, config, num_classes)
  writer = reporting.create_writer(workdir)
  reporting.log_and_print(
      f'Mixer {config.model.variant}: '
      f'{models.count_params(abstract_state.params):,} parameters, '
      f'{num_classes} classes; {num_train_steps} steps of batch '
      f'{config.batch_size} on {jax.device_count()} device(s), '
      f'{jax.process_count()} process(es); workdir {workdir}')
  try:
    state, extra = _restore_or_init(config, workdir, checkpointer, init_fn,
                                    abstract_state, mesh)
    return _train_loop(config, workdir, mesh, state, extra, checkpointer,
                       writer, p_train_step, p_eval_step, num_train_steps,
                       start_time, evals.Evaluations(config, model, mesh,
                                                     num_train_steps))
  finally:
    writer.close()
    checkpointer.close()
    workdir_lock.release(lock)


def _has_saved_steps(checkpoint_dir: str) -> bool:
  path = epath.Path(checkpoint_dir)
  return path.is_dir() and any(p.name.isdigit() for p in path.iterdir())


def _resolve_init_from(config, checkpoint_dir: str):
  """Checks config.init_from before anything is compiled or written.

  With a resolution change and `model.tokens_mlp_dim` None, returns a copy
  of the config using K^2 * D_S of the checkpoint (paper, Appendix C).
  """
  resuming = config.resume_step >= 0 or _has_saved_steps(checkpoint_dir)
  resolved = config_validation.resolve_init_from(config, resuming=resuming)
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
  config = config_validation.resolve_init_from(config, resuming=True)
  info = input_pipeline.dataset_info(config)
  num_classes = (info.num_classes if config.num_classes == -1
                 else config.num_classes)
  num_train_steps = num_train_steps_for(config, info.train_examples)
  model = create_model(config, num_classes)
  tx = optim.create_optimizer(config, num_train_steps)
  abstract_state = make_step_functions(config, model, tx,
                                       sharding.create_mesh(),
                                       num_train_steps)[-1]
  checkpointer = checkpoints.Checkpointer(
      os.path.join(workdir, CHECKPOINT_DIR), keep=config.keep_checkpoints,
      keep_best=config.keep_best_checkpoint,
      fingerprint=checkpoints.model_fingerprint(config, num_classes))
  try:
    return checkpointer.restore(abstract_state, step=step)
  finally:
    checkpointer.close()


def _resume_marker(workdir: str, step: int) -> epath.Path:
  return epath.Path(workdir) / f'resume_step_{step}.applied'


def _restore_or_init(config, workdir, checkpointer, init_fn, abstract_state,
                     mesh):
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


def _train_loop(config, workdir, mesh, state, extra, checkpointer, writer,
                p_train_step, p_eval_step, num_train_steps, start_time,
                evaluations=None):
  """The step loop; returns the summary dict.

  `evaluations` (an `evals.Evaluations`) runs config.evals when due.
  """
  step = int(sharding.to_host(state.step))
  start_step = step
  best = extra.get('best_eval_accuracy')
  last_eval = extra.get('last_eval', {})
  last_saved = step if extra else None
  # Records of steps after the resumed one (and a torn line) are from a
  # killed run: dropped, so each step is in metrics.jsonl once.
  reporting.rewind(writer, step)
  if step == 0:
    writer.write_hparams({k: v for k, v in config.to_dict().items()
                          if not isinstance(v, dict)})
  train_batches = input_pipeline.train_dataset(config, start_step=step)
  batches = sharding.prefetch(train_batches.as_numpy_iterator(), mesh,
                              config.prefetch_batches)
  progress = reporting.Progress(step, num_train_steps, config.batch_size)
  history, pending = [], []
  preempted = checkpointer.reached_preemption(step)  # Installs the handlers.
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
      reporting.log_and_print(f'First step (with compilation) took '
                              f'{progress.restart(step):.1f} s.')
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
      speed = progress.measure(step)
      train_metrics = _mean_metrics(history)
      history = []
      writer.write_scalars(step, {**train_metrics, **speed})
      reporting.log_and_print(progress.line(
          step, speed, {'loss': train_metrics['train_loss']}))
    progress.pause()
    save_metrics = None
    if do_eval:
      eval_batches = input_pipeline.eval_dataset(config).as_numpy_iterator()
      last_eval = evaluate(p_eval_step, state.params, eval_batches, mesh)
      improved = best is None or last_eval['eval_accuracy'] > best
      best = max(best or 0.0, last_eval['eval_accuracy'])
      # keep_best: also save a step that is the best so far (only those).
      do_save = do_save or (improved and config.keep_best_checkpoint)
      writer.write_scalars(step, last_eval)
      reporting.log_and_print(
          f'step {step}: eval accuracy {last_eval["eval_accuracy"]:.4f}, '
          f'loss {last_eval["eval_loss"]:.4f} (best {best:.4f})')
      save_metrics = {'eval_accuracy': last_eval['eval_accuracy']}
    if due:  # config.evals: `<name>/accuracy` etc.
      more = evaluations.run(step, state.params)
      writer.write_scalars(step, more)
      reporting.log_and_print(f'step {step}: ' + ', '.join(
          f'{k} {v:.4f}' for k, v in more.items() if 'accuracy' in k))
    if do_save:
      checkpointer.save(step, state, metrics=save_metrics, extra={
          'data_position': step, 'best_eval_accuracy': best,
          'last_eval': last_eval, 'num_train_steps': num_train_steps})
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
      'best_eval_accuracy': best, 'last_checkpoint_step': last_saved,
      'wall_time_s': time.time() - start_time, 'workdir': str(workdir),
      'checkpoint_dir': str(checkpointer.directory),
      'metrics_file': os.path.join(workdir, reporting.METRICS_FILE),
      # 1 unless something made the step recompile (shapes, dtypes, ...).
      'train_step_compilations': p_train_step._cache_size(),  # pylint: disable=protected-access
  }
  if preempted:
    logging.warning('Stopped at step %d on request (%s); restart the same '
                    'command to resume.', step, checkpointer.preemption_signal)
  reporting.log_and_print(reporting.format_summary(summary))
  return summary


def main(argv):
  """Command-line entry point (flags: see `_define_flags`)."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}; set config '
                         'values with --config.FIELD=VALUE.')
  sharding.initialize_from_flags()
  reporting.set_print_progress(False)  # absl already logs to stderr.
  reporting.quiet_library_logs()
  config = FLAGS.config
  try:
    train_and_evaluate(config, FLAGS.workdir)
  except EXPECTED_ERRORS as e:
    # Expected failures: the message says what to do; no traceback (exit 1).
    raise SystemExit(f'{type(e).__name__}: {e}') from None


def _define_flags():
  """Defines the command-line flags (only when run as a program)."""
  config_flags.DEFINE_config_file(
      'config', None, 'Training config file, e.g. configs/quickstart.py.',
      lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs.')
  sharding.define_multihost_flags()
  flags.mark_flags_as_required(['config', 'workdir'])


if __name__ == '__main__':
  _define_flags()
  # Config file problems: one line naming the file/field, no traceback.
  app.run(main, flags_parser=config_loading.parse_flags)
