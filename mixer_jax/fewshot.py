"""Few-shot linear evaluation of frozen features: `python -m mixer_jax.fewshot`.

  python -m mixer_jax.fewshot --checkpoint=workdirs/quickstart \
      --dataset=digits --shots=1,5,10 --json
  python -m mixer_jax.fewshot --checkpoint=imagenet1k/Mixer-B_16 \
      --dataset=cifar100 --image_size=224

The probe is big_vision's (`evaluators/fewshot_lsr.py`, configured by
`configs/common_fewshot.py:get_fewshot_lsr`): the model's pre-logits (the
pooled features before the head) are computed once for a train and a test
split; for each shot count k, k training examples per class are drawn, the
features are standardised with their mean and standard deviation, a
constant feature of 100 is appended (a bias that the regulariser barely
touches), and a linear map onto +-1 one-hot targets is solved in closed
form by L2-regularised least squares; the test accuracy is that of the
argmax. The regulariser is fixed at 2**10, as in big_vision (it is not
tuned per data set). Draws use seeds seed .. seed + num_seeds - 1 (big_vision:
3 seeds from 0); each is reported and so is their mean.

`--checkpoint` is anything `mixer_jax.weights.any_checkpoint.load` opens: a
training workdir, an official `.npz`, a registry or Hub name. During
training the same probe runs periodically as the `fewshot` kind of
`config.evals` (see mixer_jax/training/evals.py).
"""

# First, before TensorFlow loads: it quiets TensorFlow's C++ start-up lines.
from mixer_jax.training import command_line  # pylint: disable=g-bad-import-order
command_line.load_tensorflow_quietly()  # Reads data sets: TF is needed.

import json
import time
from typing import Dict, Mapping, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from mixer_jax.training import compiled
from mixer_jax.training import errors
from mixer_jax.training import sharding

# The appended bias feature (big_vision fewshot_lsr.BIAS_CONSTANT).
BIAS_CONSTANT = 100.0
# Shot counts and regulariser of big_vision's get_fewshot_lsr.
DEFAULT_SHOTS = (1, 5, 10, 25)
DEFAULT_L2_REG = 2.0**10
DEFAULT_NUM_SEEDS = 3
FLAGS = flags.FLAGS


# ------------------------------------------------------------ The probe.


def fit_linear(x, labels, num_classes: int, l2_reg: float):
  """Closed-form L2-regularised least squares onto +-1 one-hot targets.

  Args:
    x: (N, D) features.
    labels: (N,) int class indices.
    num_classes: C.
    l2_reg: the regulariser (> 0), on all D + 1 weights (bias included,
      whose feature is BIAS_CONSTANT so it is barely penalised).

  Returns:
    dict: 'w' (D + 1, C) float64, 'mean' and 'std' (1, D) of the
    standardisation.
  """
  if l2_reg <= 0:
    raise ValueError(f'l2_reg must be > 0, got {l2_reg}.')
  x = np.asarray(x, np.float64)
  mean = x.mean(axis=0, keepdims=True)
  std = x.std(axis=0, keepdims=True) + 1e-5
  z = _with_bias((x - mean) / std)
  targets = 2.0 * np.eye(num_classes)[np.asarray(labels)] - 1.0
  n, d = z.shape
  # The smaller of the two equivalent normal equations.
  if n >= d:
    w = np.linalg.solve(z.T @ z + l2_reg * np.eye(d), z.T @ targets)
  else:
    w = z.T @ np.linalg.solve(z @ z.T + l2_reg * np.eye(n), targets)
  return {'w': w, 'mean': mean, 'std': std}


def _with_bias(z):
  return np.pad(z, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)


def predict(probe, x):
  """Class indices the fitted probe predicts for (M, D) features."""
  z = _with_bias((np.asarray(x, np.float64) - probe['mean']) / probe['std'])
  return np.argmax(z @ probe['w'], axis=1)


def sample_shots(labels, num_classes: int, shots: int, seed: int):
  """Indices of `shots` examples per class (all of a class if it has fewer).

  Each class's examples are permuted with np.random.default_rng(seed), so
  the draws for larger shot counts contain those for smaller ones.
  """
  rng = np.random.default_rng(seed)
  labels = np.asarray(labels)
  per_class = [rng.permutation(np.flatnonzero(labels == c))
               for c in range(num_classes)]
  return np.concatenate([idx[:shots] for idx in per_class]).astype(np.int64)


def probe_accuracies(train_features, train_labels, test_features, test_labels,
                     num_classes: int, *, shots: Sequence[int],
                     l2_reg: float = DEFAULT_L2_REG,
                     num_seeds: int = DEFAULT_NUM_SEEDS,
                     seed: int = 0) -> Dict[int, list]:
  """{shots: [test accuracy of each seed's draw]}.

  A shot count above a class's number of training examples uses all of that
  class (with a warning): the result is then not a k-shot number.
  """
  if any(int(k) < 1 for k in shots):
    raise ValueError(f'shots={list(shots)}: each count must be >= 1.')
  counts = np.bincount(np.asarray(train_labels), minlength=num_classes)
  for k in shots:
    if k > counts.min():
      logging.warning(
          '%d-shot: %d of %d classes have fewer than %d training examples '
          '(the smallest has %d); those classes use all they have.', k,
          int(np.sum(counts < k)), num_classes, k, int(counts.min()))
  results = {k: [] for k in shots}
  for s in range(seed, seed + num_seeds):
    for k in shots:
      idx = sample_shots(train_labels, num_classes, k, s)
      probe = fit_linear(train_features[idx], train_labels[idx], num_classes,
                         l2_reg)
      hits = predict(probe, test_features) == np.asarray(test_labels)
      results[k].append(float(np.mean(hits)))
  return results


# ------------------------------------------------------- Features.


def features_of(features_fn, params, batches, mesh, stop_requested=None):
  """(features (N, D), labels (N,)) of the real examples of `batches`.

  None when `stop_requested()` turns True before a batch.
  """
  feats, labels = [], []
  for batch in sharding.prefetch(batches, mesh):
    if stop_requested is not None and stop_requested():
      return None
    f, y, m = sharding.to_host((features_fn(params, batch['image']),
                                batch['label'], batch['mask']))
    keep = m > 0
    feats.append(f[keep])
    labels.append(np.argmax(y, -1)[keep])
  if not feats:
    raise ValueError('The few-shot data yielded no batch.')
  return np.concatenate(feats), np.concatenate(labels)


def split_batches(dataset: str, split: str, *, data_dir, batch_size: int,
                  image_size: int, crop: str, resize: int,
                  resize_method: str):
  """(padded eval batches of a TFDS split for this process, class count)."""
  from mixer_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from mixer_jax.data.datasets import sources  # pylint: disable=g-import-not-at-top
  source = sources.TfdsSource(dataset, data_dir)
  if source.num_classes <= 0:
    raise ValueError(f'{dataset} has no class label for a few-shot probe.')
  index, count = jax.process_index(), jax.process_count()
  largest = max(source.shard_size(split, i, count) for i in range(count))
  if largest <= 0:
    raise ValueError(f'Split {split!r} of {dataset} is empty.')
  batches = input_pipeline.padded_eval_dataset(
      source.read(split, index, count), largest, batch_size=batch_size,
      image_size=image_size, num_classes=source.num_classes, crop=crop,
      resize=resize, resize_method=resize_method, process_count=count)
  return batches.as_numpy_iterator(), source.num_classes


def evaluate_datasets(features_fn, params,
                      datasets: Mapping[str, Sequence[str]], *,
                      mesh, data_dir=None, batch_size: int, image_size: int,
                      crop: str, resize: int, resize_method: str,
                      shots: Sequence[int], l2_reg: float, num_seeds: int,
                      seed: int = 0, stop_requested=None
                      ) -> Optional[Dict[str, dict]]:
  """Few-shot probes of a feature model on several data sets.

  Args:
    features_fn: the run's feature pass (`compiled.features_function`,
      `RunFunctions.features_step`).
    params: its parameters (no head), placed as features_fn expects.
    datasets: {name: (tfds_name, train_split, test_split)}.
    mesh: device mesh (batches are sharded over it).
    data_dir: TFDS data directory (None: TFDS's default).
    batch_size: global batch of the feature pass.
    image_size, crop, resize, resize_method: preprocessing (see
      preprocess.eval_image).
    shots, l2_reg, num_seeds, seed: see `probe_accuracies`.
    stop_requested: checked between data sets and batches.

  Returns:
    {name: {shots: [accuracy per seed]}}; None when asked to stop.
  """
  results = {}
  for name, (tfds_name, train_split, test_split) in datasets.items():
    if stop_requested is not None and stop_requested():
      return None
    pp = dict(data_dir=data_dir, batch_size=batch_size, image_size=image_size,
              crop=crop, resize=resize, resize_method=resize_method)
    train, num_classes = split_batches(tfds_name, train_split, **pp)
    test, _ = split_batches(tfds_name, test_split, **pp)
    train_features = features_of(features_fn, params, train, mesh,
                                 stop_requested)
    if train_features is None:
      return None
    test_features = features_of(features_fn, params, test, mesh,
                                stop_requested)
    if test_features is None:
      return None
    (x_train, y_train), (x_test, y_test) = train_features, test_features
    results[name] = probe_accuracies(
        x_train, y_train, x_test, y_test, num_classes, shots=shots,
        l2_reg=l2_reg, num_seeds=num_seeds, seed=seed)
  return results


# ------------------------------------------------------- The command.


def load_features_model(checkpoint: str, image_size=None):
  """(model without head, params, Loaded) of any checkpoint kind."""
  from mixer_jax.weights import any_checkpoint  # pylint: disable=g-import-not-at-top
  loaded = any_checkpoint.load(checkpoint, image_size=image_size)
  model, params = loaded.features()
  return model, params, loaded


def run(checkpoint: str, dataset: str, *, shots=(1, 5, 10), train_split='train',
        test_split='test', data_dir=None, batch_size=64, image_size=None,
        l2_reg=DEFAULT_L2_REG, num_seeds=DEFAULT_NUM_SEEDS, seed=0):
  """Runs the probes of one checkpoint on one data set; list of result rows.

  Preprocessing is the checkpoint's own eval crop at its image size (for
  a workdir, its config's eval_crop, eval_resize and eval_resize_method).
  """
  start = time.time()
  model, params, loaded = load_features_model(checkpoint, image_size)
  config = loaded.config
  method = (config.pp.get('eval_resize_method', 'area') if config is not None
            else 'area')
  mesh = sharding.create_mesh()
  params = sharding.replicate(params, mesh)
  features_fn = compiled.features_function(
      model, mesh, sharding.state_shardings(params, mesh, 'replicate'))
  results = evaluate_datasets(
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
  """The --shots flag ('1,5,10') as a tuple of counts >= 1."""
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
    if len(argv) > 1:
      raise errors.UsageError(f'Unexpected arguments: {argv[1:]}.')
    shots = parse_shots(FLAGS.shots)
    sharding.initialize_from_flags()
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], 'GPU')  # TF only reads data here.
    rows = run(FLAGS.checkpoint, FLAGS.dataset, shots=shots,
               train_split=FLAGS.train_split, test_split=FLAGS.test_split,
               data_dir=FLAGS.data_dir, batch_size=FLAGS.batch_size,
               image_size=FLAGS.image_size, l2_reg=FLAGS.l2_reg,
               num_seeds=FLAGS.num_seeds, seed=FLAGS.seed)
  if jax.process_index() != 0:
    return
  for row in rows:
    if FLAGS.json:
      print(json.dumps(row), flush=True)
    else:
      print(f'{row["dataset"]} {row["shots"]}-shot: accuracy '
            f'{row["accuracy"]:.4f} (seeds {row["accuracy_per_seed"]})')


def _define_flags():
  flags.DEFINE_string('checkpoint', None, 'Workdir, .npz, registry or Hub '
                      'name (see mixer_jax.weights.any_checkpoint).')
  flags.DEFINE_string('dataset', 'digits', 'TFDS data set to probe.')
  flags.DEFINE_string('train_split', 'train', 'Split the shots come from.')
  flags.DEFINE_string('test_split', 'test', 'Split the probe is scored on.')
  flags.DEFINE_string('shots', '1,5,10,25', 'Comma-separated shot counts.')
  flags.DEFINE_float('l2_reg', DEFAULT_L2_REG, 'L2 regulariser.')
  flags.DEFINE_integer('num_seeds', DEFAULT_NUM_SEEDS, 'Draws of the shots.')
  flags.DEFINE_integer('seed', 0, 'First draw seed.')
  flags.DEFINE_integer('batch_size', 64, 'Batch of the feature pass.')
  flags.DEFINE_integer('image_size', None, 'Input side (default: the '
                       "checkpoint's).")
  flags.DEFINE_string('data_dir', None, 'TFDS data directory.')
  flags.DEFINE_bool('json', False, 'One JSON object per (dataset, shots).')
  sharding.define_multihost_flags()
  command_line.define_verbose_flag()
  flags.mark_flags_as_required(['checkpoint'])


if __name__ == '__main__':
  _define_flags()
  app.run(main)
