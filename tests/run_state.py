"""What tests read of a training run: its saved state, its compilations."""

import contextlib

import jax

from mixer_jax.checkpointing import checkpoints
from mixer_jax.checkpointing import fingerprint
from mixer_jax.data import input_pipeline
from mixer_jax.training import init_from_checks
from mixer_jax.training import trainer


def load_train_state(config, workdir, step=None):
  """(state, extra) that `train_and_evaluate` saved in `workdir` at `step`
  (default the latest), restored as the trainer restores it."""
  config = init_from_checks.resolve_init_from(config, resuming=True)
  run = trainer.build_run(config, input_pipeline.dataset_info(config))
  checkpointer = checkpoints.Checkpointer(
      f'{workdir}/{trainer.CHECKPOINT_DIR}', keep=config.keep_checkpoints,
      keep_best=config.keep_best_checkpoint,
      fingerprint=fingerprint.model_fingerprint(config, run.num_classes))
  try:
    return checkpointer.restore(run.steps.abstract_state, step=step)
  finally:
    checkpointer.close()


@contextlib.contextmanager
def compilations():
  """Yields the names XLA compiles meanwhile (`jit(train_step)`, ...)."""
  names = []

  def listener(event, duration, **kwargs):
    del duration
    if event == '/jax/core/compile/backend_compile_duration':
      names.append(kwargs.get('fun_name'))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield names
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
