"""Trains and evaluates an MLP-Mixer: `python -m mixer_jax.train`.

  python -m mixer_jax.train --config=configs/quickstart.py --workdir=/tmp/qs
  python -m mixer_jax.train --config=configs/b16.py --workdir=gs://b/run \
      --config.batch_size=1024

A run stopped by SIGTERM/SIGINT saves its step; the same command resumes
it. `--check_only` runs `training.launch_check` instead:

  python -m mixer_jax.train --config=configs/mixer_i1k.py:L_16 \
      --workdir=DIR --check_only --devices=8 --config.sharding=fsdp
"""

import functools
import sys

from absl import app
from absl import flags

# Before TensorFlow loads: it quiets TensorFlow's C++ start-up lines.
from mixer_jax.errors import UserError
from mixer_jax.training import command_line
from mixer_jax.training import config_loading
from mixer_jax.training import errors

FLAGS = flags.FLAGS


def main(argv):
  command_line.set_up_output(FLAGS.verbose)
  # Progress and the summary go to stdout (reporting.log_and_print); user
  # errors are one line (exit 1), anything else keeps its traceback.
  with command_line.user_errors_as_one_line():
    if FLAGS.workdir is None and not FLAGS.check_only:
      raise errors.UsageError('--workdir is required (unless --check_only).')
    command_line.load_tensorflow_quietly()  # Reads data sets: TF is needed.
    import jax  # pylint: disable=g-import-not-at-top
    if FLAGS.devices:
      # Before JAX starts a backend: plan on N CPU devices, whatever is here.
      jax.config.update('jax_platforms', 'cpu')
      jax.config.update('jax_num_cpu_devices', FLAGS.devices)
    command_line.start_multihost(argv)
    if FLAGS.check_only:
      return _check_only()
    # pylint: disable=g-import-not-at-top
    from mixer_jax.checkpointing import preemption
    from mixer_jax.training import trainer
    with preemption.stop_at_once_before_training():
      trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def _check_only():
  """The launch check: a table on stdout, exit 1 with one line on failure."""
  from mixer_jax.training import launch_check  # pylint: disable=g-import-not-at-top
  try:
    plan = launch_check.check(FLAGS.config)
  except (UserError, launch_check.LaunchCheckError, ValueError) as e:
    raise SystemExit(f'Launch check failed: {type(e).__name__}: '
                     f'{" ".join(str(e).split())}') from None
  source = next((a.split('=', 1)[1] for a in sys.argv
                 if a.startswith('--config=')), '')
  print(launch_check.format_plan(plan, FLAGS.device_memory_gib, source),
        flush=True)
  if not launch_check.fits(plan, FLAGS.device_memory_gib):
    raise SystemExit(f'Launch check failed: a function needs more than '
                     f'--device_memory_gib={FLAGS.device_memory_gib:g} per '
                     'device (rows marked NO).')


def _define_flags():
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs '
                      '(required unless --check_only).')
  flags.DEFINE_bool('check_only', False, 'Launch check: compile every '
                    'function of the run from abstract shapes and print '
                    'their costs; reads no data, writes nothing.')
  flags.DEFINE_integer('devices', 0, 'Plan on this many fake CPU devices '
                       '(with --check_only).', lower_bound=0)
  flags.DEFINE_float('device_memory_gib', None, 'With --check_only: say '
                     'whether each function fits this much memory per '
                     'device (exit 1 if one does not).')
  command_line.define_verbose_flag()


if __name__ == '__main__':
  _define_flags()
  # Config file problems: one line naming the file/field, no traceback.
  app.run(main, flags_parser=functools.partial(
      config_loading.parse_flags,
      help_text='Training config file, e.g. configs/quickstart.py.'))
