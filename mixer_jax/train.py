"""Trains and evaluates an MLP-Mixer: `python -m mixer_jax.train`.

  python -m mixer_jax.train --config=configs/quickstart.py --workdir=/tmp/qs
  python -m mixer_jax.train --config=configs/b16.py --workdir=gs://b/run \
      --config.batch_size=1024

The job itself is `mixer_jax.training.trainer.train_and_evaluate(config,
workdir)`; this module is its command line. A run stopped by SIGTERM/SIGINT
saves its current step; the same command resumes it exactly.
"""

# First, before TensorFlow loads: it quiets TensorFlow's C++ start-up lines.
from mixer_jax.training import command_line  # pylint: disable=g-bad-import-order
command_line.load_tensorflow_quietly()  # Reads data sets: TF is needed.

from absl import app
from absl import flags
from ml_collections import config_flags

from mixer_jax.training import config_loading
from mixer_jax.training import errors
from mixer_jax.training import sharding
from mixer_jax.training import trainer

FLAGS = flags.FLAGS


def main(argv):
  """Command-line entry point (flags: see `_define_flags`)."""
  command_line.set_up_output(FLAGS.verbose)
  # Progress and the summary go to stdout (reporting.log_and_print); user
  # errors are one line (exit 1), anything else keeps its traceback.
  with command_line.user_errors_as_one_line():
    if len(argv) > 1:
      raise errors.UsageError(f'Unexpected arguments: {argv[1:]}; set config '
                              'values with --config.FIELD=VALUE.')
    sharding.initialize_from_flags()
    trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def _define_flags():
  """Defines the command-line flags (only when run as a program)."""
  config_flags.DEFINE_config_file(
      'config', None, 'Training config file, e.g. configs/quickstart.py.',
      lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs.')
  sharding.define_multihost_flags()
  command_line.define_verbose_flag()
  flags.mark_flags_as_required(['config', 'workdir'])


if __name__ == '__main__':
  _define_flags()
  # Config file problems: one line naming the file/field, no traceback.
  app.run(main, flags_parser=config_loading.parse_flags)
