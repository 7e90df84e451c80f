"""Evaluates a trained or published Mixer: `python -m mixer_jax.evaluate`.

  python -m mixer_jax.evaluate --config=configs/quickstart.py \
      --checkpoint=/tmp/qs
  python -m mixer_jax.evaluate --config=configs/finetune_cifar10.py \
      --checkpoint=/path/to/Mixer-B_16.npz

Reports top-1 and top-5 accuracy and the mean loss over `config.eval_split`,
each example counted exactly once (the eval pipeline pads the last batch and
masks the padding), with the batch sharded over every device of every host
(`sharding.create_mesh`).

`--checkpoint` is one of:
- a training workdir (its `checkpoints/` are used), an Orbax checkpoint
  directory, or one step directory in it (`.../checkpoints/2000`). The
  newest step is used unless `--step=K` names another, which is also the way
  to fall back when the newest is damaged. Only the parameters are read, and
  nothing in the directory is written, so a running job can be evaluated.
- an official-format `.npz` file, a registry name
  ("imagenet1k/Mixer-B_16"), a Hub name
  ("hf-hub:timm/mixer_b16_224.goog_in21k_ft_in1k[@revision]"), a timm
  `.safetensors` or a Hub folder (`export --format=hub`), loaded by
  `any_checkpoint.load`.
With a workdir, `--config` may be left out: the run's own config
(`run_info.json`, written by mixer_jax.train) is used.
"""

import functools
import json
import math
import time
from typing import Any, Dict, Optional

from absl import app
from absl import flags
from absl import logging

# Before TensorFlow loads: it quiets TensorFlow's C++ start-up lines.
from mixer_jax.training import command_line
from mixer_jax.training import config_loading
from mixer_jax.training import errors

FLAGS = flags.FLAGS


def load_params(config, checkpoint: str, num_classes: int, mesh,
                step: Optional[int] = None, weights: str = 'params'):
  """(model, parameters replicated over `mesh`, what was loaded).

  A workdir is read with `config`'s model, which must be the one its
  checkpoint was saved with (its fingerprint says); anything else is read
  by `any_checkpoint.load`, and its head must have `num_classes` classes.

  Raises:
    checkpoint_checks.CheckpointError: naming the step directory and the
      mismatch, or a head that does not fit the data.
  """
  # pylint: disable=g-import-not-at-top
  from mixer_jax.checkpointing import checkpoint_checks
  from mixer_jax.training import init_from_checks
  from mixer_jax.training import sharding
  from mixer_jax.weights import any_checkpoint
  from mixer_jax.weights import workdir_checkpoint
  if workdir_checkpoint.is_directory(checkpoint):
    _, directory, step = workdir_checkpoint.locate_workdir(checkpoint, step)
    # A run fine-tuned at a higher resolution derived its token-mixing width.
    config = init_from_checks.resolve_init_from(config, resuming=True)
    model, params, extra = workdir_checkpoint.restore_params(
        directory, config, num_classes, step, sharding.replicated(mesh),
        weights)
    return model, params, f'{directory} step {extra["step"]}' + (
        ' (EMA weights)' if weights == 'ema' else '')
  # Run with the GELU form its weights were trained with (weights.hub).
  loaded = any_checkpoint.load(checkpoint, image_size=config.image_size,
                               weights=weights, dtype=config.model.dtype)
  if loaded.num_classes != num_classes:
    raise checkpoint_checks.CheckpointError(
        f'{checkpoint} has a {loaded.num_classes}-class head but '
        f'{config.dataset} has {num_classes} classes; fine-tune it first '
        f'(train with --config.init_from={checkpoint}) and evaluate that '
        'run.')
  return loaded.model, sharding.replicate(loaded.params, mesh), checkpoint


def evaluate(config, checkpoint: str, *, step: Optional[int] = None,
             weights: str = 'params',
             progress_every_s: float = 10.0) -> Dict[str, Any]:
  """Evaluates `checkpoint` on `config.eval_split` over all devices.

  Args:
    config: the run's ConfigDict (data, model and batch size).
    checkpoint: see the module docstring.
    step: Orbax step to evaluate (default: the newest).
    weights: a workdir's 'params' or 'ema' (its EMA of the weights).
    progress_every_s: seconds between progress lines.

  Returns:
    Dict with 'top1', 'top5', 'loss', 'examples', 'nan_rows', 'checkpoint',
    'eval_split', 'seconds'.
  """
  # pylint: disable=g-import-not-at-top
  import jax
  from mixer_jax.data import input_pipeline
  from mixer_jax.training import compiled
  from mixer_jax.training import config_validation
  from mixer_jax.training import evals
  from mixer_jax.training import reporting
  from mixer_jax.training import trainer
  config_validation.validate_config(config, num_devices=jax.device_count(),
                                    num_processes=jax.process_count())
  start = time.time()
  mesh = trainer.create_mesh(config)
  info = input_pipeline.dataset_info(config)
  model, params, loaded = load_params(config, checkpoint, info.num_classes,
                                      mesh, step, weights)
  # The run's own eval step, parameters placed as in training.
  functions = compiled.build(config, model, mesh)
  params = jax.device_put(params, functions.params_sharding)
  total_batches = math.ceil(info.eval_examples / config.batch_size)
  last_report = [time.time()]

  def report(i):
    if time.time() - last_report[0] >= progress_every_s:
      last_report[0] = time.time()
      rate = i * config.batch_size / (last_report[0] - start)
      reporting.log_and_print(f'eval: batch {i}/~{total_batches}, '
                              f'{rate:.0f} images/s')

  result = evals.evaluate_dataset(
      functions.eval_step, params,
      input_pipeline.eval_dataset(config).as_numpy_iterator(), mesh,
      prefetch=config.prefetch_batches, on_batch=report)
  return {'top1': result['accuracy'], 'top5': result['top5'],
          'loss': result['loss'], 'examples': result['examples'],
          'nan_rows': result['nan_rows'], 'checkpoint': loaded,
          'eval_split': config.eval_split, 'seconds': time.time() - start}


def main(argv):
  """Command-line entry point (the config was read with the flags)."""
  command_line.set_up_output(FLAGS.verbose)
  # User errors are one line (exit 1); anything else keeps its traceback.
  with command_line.user_errors_as_one_line():
    command_line.load_tensorflow_quietly()  # Reads data sets: TF is needed.
    argv = command_line.start_multihost(argv)
    if len(argv) > 1:
      raise errors.UsageError(f'Unexpected arguments: {argv[1:]}; set config '
                              'values with --config.FIELD=VALUE.')
    result = evaluate(FLAGS.config, FLAGS.checkpoint, step=FLAGS.step,
                      weights=FLAGS.weights)
  import jax  # pylint: disable=g-import-not-at-top
  from mixer_jax.training import evals  # pylint: disable=g-import-not-at-top
  text = (f'{result["checkpoint"]} on {result["eval_split"]}: '
          f'top-1 {result["top1"]:.4f}, top-5 {result["top5"]:.4f}, '
          f'loss {result["loss"]:.4f} ({result["examples"]} examples, '
          f'{result["seconds"]:.1f} s){evals.nan_note(result["nan_rows"])}')
  logging.info(text)
  if jax.process_index() == 0:
    print(text)
    if FLAGS.output:
      with open(FLAGS.output, 'w') as f:
        json.dump(result, f, indent=2)


def _config_of_workdir():
  """For a missing --config: the config saved with the --checkpoint workdir.

  Read while the flags are parsed, so `--config.FIELD=VALUE` overrides
  apply to it.
  """
  command_line.load_tensorflow_quietly()  # The readers below load it.
  # pylint: disable=g-import-not-at-top
  from etils import epath
  from mixer_jax.weights import registry
  from mixer_jax.weights import run_info
  from mixer_jax.weights import workdir_checkpoint
  checkpoint = FLAGS.checkpoint
  if checkpoint is None:
    return None  # absl reports the missing required flag.
  if workdir_checkpoint.is_directory(checkpoint):
    return run_info.read_run_info(workdir_checkpoint.locate_workdir(
        checkpoint)[0])['config']
  path = epath.Path(checkpoint)
  # A path (absolute, or in an existing directory) and not a registry name.
  if not path.exists() and (path.is_absolute() or path.parent.is_dir()):
    raise registry.CheckpointNotFoundError(
        f'--checkpoint={checkpoint}: no such file or directory.')
  raise errors.UsageError(
      f'--config is required: --checkpoint={checkpoint} is a weight file or '
      'name, not a training workdir, so it does not say which data to '
      'evaluate on.')


def _define_flags():
  """Defines the command-line flags (only when run as a program)."""
  flags.DEFINE_string('checkpoint', None, 'Training workdir, Orbax checkpoint '
                      '(step) directory, official .npz or registry name.')
  flags.DEFINE_integer('step', None, 'Orbax step to evaluate (default: the '
                       'newest); the fallback when the newest is damaged.')
  flags.DEFINE_string('output', None, 'Also write the results to this JSON '
                      'file.')
  flags.DEFINE_enum('weights', 'params', ['params', 'ema'],
                    "A workdir's trained weights, or their EMA (runs with "
                    'config.ema_decay > 0).')
  command_line.define_verbose_flag()
  flags.mark_flags_as_required(['checkpoint'])


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=functools.partial(
      config_loading.parse_flags, config_when_missing=_config_of_workdir,
      help_text='Config file describing the model and eval data, e.g. '
      'configs/quickstart.py. Optional for a training workdir: the config '
      'saved with the run (run_info.json) is used.'))
