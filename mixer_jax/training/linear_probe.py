"""Few-shot linear probes of frozen features (big_vision's fewshot_lsr).

For each shot count k, k training examples per class are drawn; their
pre-logits, standardised and with a constant bias feature, are mapped onto
+-1 one-hot targets by closed-form L2-regularised least squares (the
regulariser fixed at 2**10 as in big_vision, not tuned per data set); the
score is the test accuracy of the argmax, per seed and in the mean.
"""

from typing import Dict, Mapping, Optional, Sequence

from absl import logging
import numpy as np

from mixer_jax.data import input_pipeline
from mixer_jax.data.datasets import sources
from mixer_jax.training import sharding

# The appended bias feature (big_vision fewshot_lsr.BIAS_CONSTANT).
BIAS_CONSTANT = 100.0


def fit_linear(x, labels, num_classes: int, l2_reg: float):
  """The probe ('w', 'mean', 'std') of (N, D) features and (N,) labels.

  The regulariser covers the bias too, barely: its feature is BIAS_CONSTANT.
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
                     l2_reg: float, num_seeds: int,
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
  source = sources.TfdsSource(dataset, data_dir)
  if source.num_classes <= 0:
    raise ValueError(f'{dataset} has no class label for a few-shot probe.')
  batches = input_pipeline.eval_batches(
      source, split, batch_size=batch_size, image_size=image_size,
      num_classes=source.num_classes, crop=crop, resize=resize,
      resize_method=resize_method)
  return batches.as_numpy_iterator(), source.num_classes


def evaluate_datasets(features_fn, params,
                      datasets: Mapping[str, Sequence[str]], *,
                      mesh, data_dir=None, batch_size: int, image_size: int,
                      crop: str, resize: int, resize_method: str,
                      shots: Sequence[int], l2_reg: float, num_seeds: int,
                      seed: int = 0, stop_requested=None
                      ) -> Optional[Dict[str, dict]]:
  """{name: {shots: [accuracy per seed]}} of `datasets` ({name: (tfds name,
  train split, test split)}); None when a stop is requested."""
  results = {}
  for name, (tfds_name, train_split, test_split) in datasets.items():
    if stop_requested is not None and stop_requested():
      return None
    pp = dict(data_dir=data_dir, batch_size=batch_size, image_size=image_size,
              crop=crop, resize=resize, resize_method=resize_method)
    train, num_classes = split_batches(tfds_name, train_split, **pp)
    test, _ = split_batches(tfds_name, test_split, **pp)
    features = [features_of(features_fn, params, batches, mesh,
                            stop_requested) for batches in (train, test)]
    if None in features:
      return None
    (x_train, y_train), (x_test, y_test) = features
    results[name] = probe_accuracies(
        x_train, y_train, x_test, y_test, num_classes, shots=shots,
        l2_reg=l2_reg, num_seeds=num_seeds, seed=seed)
  return results
