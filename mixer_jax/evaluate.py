"""Evaluates a trained or published Mixer: `python -m mixer_jax.evaluate`.

  python -m mixer_jax.evaluate --config=configs/quickstart.py \
      --checkpoint=/tmp/qs
  python -m mixer_jax.evaluate --config=configs/finetune_cifar10.py \
      --checkpoint=/path/to/Mixer-B_16.npz

Top-1, top-5 and mean loss over `config.eval_split`. A workdir needs no
`--config`: the run's own is used, `--config.FIELD=VALUE` applied to it.
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


def load_params(config, checkpoint: str, num_classes: int,
                step: Optional[int] = None, weights: str = 'params'):
  """(model, host parameters, what was loaded); CheckpointError unless it
  is `config`'s model with `num_classes`."""
  # pylint: disable=g-import-not-at-top
  from mixer_jax.checkpointing import checkpoint_checks
  from mixer_jax.checkpointing import fingerprint
  from mixer_jax.training import init_from_checks
  from mixer_jax.weights import any_checkpoint
  from mixer_jax.weights import workdir_checkpoint
  # Run with the GELU form its weights were trained with (weights.hub).
  loaded = any_checkpoint.load(checkpoint, step=step, weights=weights,
                               image_size=config.image_size,
                               dtype=config.model.dtype)
  if loaded.kind == 'workdir':
    # A run fine-tuned at a higher resolution derived its token-mixing width.
    config = init_from_checks.resolve_init_from(config, resuming=True)
    directory = workdir_checkpoint.locate_workdir(checkpoint, step)[1]
    checkpoint_checks.check_fingerprint(
        fingerprint.model_fingerprint(config, num_classes),
        fingerprint.model_fingerprint(loaded.config, loaded.num_classes),
        f'{directory}/{loaded.step}', '')
  elif loaded.num_classes != num_classes:
    raise checkpoint_checks.CheckpointError(
        f'{checkpoint} has a {loaded.num_classes}-class head but '
        f'{config.dataset} has {num_classes} classes; fine-tune it first '
        f'(train with --config.init_from={checkpoint}) and evaluate that '
        'run.')
  return loaded.model, loaded.params, loaded.source


def evaluate(config, checkpoint: str, *, step: Optional[int] = None,
             weights: str = 'params',
             progress_every_s: float = 10.0) -> Dict[str, Any]:
  """Scores `checkpoint` on `config.eval_split` over all devices, a
  progress line every `progress_every_s`."""
  # pylint: disable=g-import-not-at-top
  import jax
  from mixer_jax.data import input_pipeline
  from mixer_jax.training import compiled
  from mixer_jax.training import config_validation
  from mixer_jax.training import evals
  from mixer_jax.training import reporting
  from mixer_jax.training import sharding
  from mixer_jax.training import trainer
  config_validation.validate_config(config, num_devices=jax.device_count(),
                                    num_processes=jax.process_count())
  start = time.time()
  mesh = trainer.create_mesh(config)
  info = input_pipeline.dataset_info(config)
  model, params, loaded = load_params(config, checkpoint, info.num_classes,
                                      step, weights)
  # The run's own eval step, parameters placed as in training.
  functions = compiled.build(config, model, mesh)
  params = sharding.put(params, functions.params_sharding)
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
  command_line.set_up_output(FLAGS.verbose)
  # User errors are one line (exit 1); anything else keeps its traceback.
  with command_line.user_errors_as_one_line():
    command_line.load_tensorflow_quietly()  # Reads data sets: TF is needed.
    command_line.start_multihost(argv)
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
  """For a missing --config: the --checkpoint workdir's (read while the
  flags are parsed, so `--config.FIELD=VALUE` applies)."""
  command_line.load_tensorflow_quietly()  # The readers below load it.
  # pylint: disable=g-import-not-at-top
  from mixer_jax.weights import run_info
  from mixer_jax.weights import workdir_checkpoint
  checkpoint = FLAGS.checkpoint
  if checkpoint is None:
    return None  # absl reports the missing required flag.
  if not workdir_checkpoint.is_directory(checkpoint):
    raise errors.UsageError(
        f'--config is required: --checkpoint={checkpoint} is not a training '
        'workdir, so it does not say which data to evaluate on.')
  return run_info.read_run_info(workdir_checkpoint.locate_workdir(
      checkpoint)[0])['config']


def _define_flags():
  command_line.define_checkpoint_flags()
  flags.DEFINE_string('output', None, 'Also write the results to this JSON '
                      'file.')
  command_line.define_verbose_flag()


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=functools.partial(
      config_loading.parse_flags, config_when_missing=_config_of_workdir,
      help_text='Config file describing the model and eval data, e.g. '
      'configs/quickstart.py. Optional for a training workdir: the config '
      'saved with the run (run_info.json) is used.'))
