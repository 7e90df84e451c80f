"""Few-shot linear evaluation of frozen features: `python -m mixer_jax.fewshot`.

  python -m mixer_jax.fewshot --checkpoint=workdirs/quickstart \
      --dataset=digits --shots=1,5,10 --json
  python -m mixer_jax.fewshot --checkpoint=imagenet1k/Mixer-B_16 \
      --dataset=cifar100 --image_size=224

big_vision's probe (`training.linear_probe`), as config.evals' `fewshot`.
"""

import json
import time

from absl import app
from absl import flags

from mixer_jax import config_defaults
# Before TensorFlow loads: it quiets TensorFlow's C++ start-up lines.
from mixer_jax.training import command_line
from mixer_jax.training import errors

FLAGS = flags.FLAGS
# The defaults of a `fewshot` entry of config.evals (big_vision's).
PROBE = config_defaults.eval_entry('fewshot')


def run(checkpoint: str, dataset: str, *, step=None, weights='params',
        shots=(1, 5, 10), train_split='train', test_split='test',
        data_dir=None, batch_size=64, image_size=None, l2_reg=PROBE.l2_reg,
        num_seeds=PROBE.num_seeds, seed=0):
  """The probes' result rows, images preprocessed as the checkpoint's eval."""
  # pylint: disable=g-import-not-at-top
  import numpy as np
  from mixer_jax.training import compiled
  from mixer_jax.training import linear_probe
  from mixer_jax.training import sharding
  from mixer_jax.weights import any_checkpoint
  start = time.time()
  loaded = any_checkpoint.load(checkpoint, step=step, weights=weights,
                               image_size=image_size)
  model, params = loaded.features()
  method = loaded.config.pp.eval_resize_method if loaded.config else 'area'
  mesh = sharding.create_mesh()
  params = sharding.replicate(params, mesh)
  features_fn = compiled.features_function(
      model, mesh, sharding.state_shardings(params, mesh, 'replicate'))
  results = linear_probe.evaluate_datasets(
      features_fn, params, {dataset: (dataset, train_split, test_split)},
      mesh=mesh, data_dir=data_dir, batch_size=batch_size,
      image_size=loaded.image_size, crop=loaded.eval_crop,
      resize=loaded.eval_resize, resize_method=method, shots=shots,
      l2_reg=l2_reg, num_seeds=num_seeds, seed=seed)
  return [{'checkpoint': loaded.source, 'dataset': dataset, 'shots': k,
           'accuracy': float(np.mean(accs)), 'accuracy_per_seed': accs,
           'seeds': list(range(seed, seed + num_seeds)), 'l2_reg': l2_reg,
           'train_split': train_split, 'test_split': test_split,
           'seconds': time.time() - start}
          for k, accs in results[dataset].items()]


def parse_shots(text: str):
  try:
    shots = tuple(int(k) for k in text.split(',') if k.strip())
  except ValueError:
    shots = ()
  if not shots or min(shots) < 1:
    raise errors.UsageError(f'--shots={text}: give comma-separated counts '
                            'of examples per class, each >= 1, e.g. 1,5,10.')
  return shots


def main(argv):
  command_line.set_up_output(FLAGS.verbose)
  # User errors are one line (exit 1); anything else keeps its traceback.
  with command_line.user_errors_as_one_line():
    shots = parse_shots(FLAGS.shots)
    command_line.load_tensorflow_quietly()  # Reads data sets: TF is needed.
    command_line.start_multihost(argv)
    rows = run(FLAGS.checkpoint, FLAGS.dataset, step=FLAGS.step,
               weights=FLAGS.weights, shots=shots,
               train_split=FLAGS.train_split, test_split=FLAGS.test_split,
               data_dir=FLAGS.data_dir, batch_size=FLAGS.batch_size,
               image_size=FLAGS.image_size, l2_reg=FLAGS.l2_reg,
               num_seeds=FLAGS.num_seeds, seed=FLAGS.seed)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return
  for row in rows:
    if FLAGS.json:
      print(json.dumps(row), flush=True)
    else:
      print(f'{row["dataset"]} {row["shots"]}-shot: accuracy '
            f'{row["accuracy"]:.4f} (seeds {row["accuracy_per_seed"]})')


def _define_flags():
  command_line.define_checkpoint_flags()
  flags.DEFINE_string('dataset', 'digits', 'TFDS data set to probe.')
  flags.DEFINE_string('train_split', 'train', 'Split the shots come from.')
  flags.DEFINE_string('test_split', 'test', 'Split the probe is scored on.')
  flags.DEFINE_string('shots', ','.join(map(str, PROBE.shots)),
                      'Comma-separated shot counts.')
  flags.DEFINE_float('l2_reg', PROBE.l2_reg, 'L2 regulariser.')
  flags.DEFINE_integer('num_seeds', PROBE.num_seeds, 'Draws of the shots.')
  flags.DEFINE_integer('seed', 0, 'First draw seed.')
  flags.DEFINE_integer('batch_size', 64, 'Batch of the feature pass.')
  flags.DEFINE_integer('image_size', None, 'Input side (default: the '
                       "checkpoint's).")
  flags.DEFINE_string('data_dir', None, 'TFDS data directory.')
  flags.DEFINE_bool('json', False, 'One JSON object per (dataset, shots).')
  command_line.define_verbose_flag()


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=command_line.parse_known_flags)
