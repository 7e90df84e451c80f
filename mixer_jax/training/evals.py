"""The evaluations of a training run, each an entry with a name.

The main eval, its EMA twin and each `config.evals` entry (docs/recipes.md,
"Evaluations"). A stop request is checked between entries, data sets and
batches: the entries left are returned, and the trainer saves first.
"""

from typing import Callable, Dict, Iterable, List, Optional

import jax
import numpy as np

from mixer_jax.data.datasets import sources
from mixer_jax.data import input_pipeline
from mixer_jax.training import compiled
from mixer_jax.training import linear_probe
from mixer_jax.training import reporting
from mixer_jax.training import sharding

MAIN_EVAL = ''  # config.eval_split, scored with the trained parameters.
EMA_EVAL = 'ema/'  # The same, scored with their EMA.


def evaluate_dataset(step_fn, params, batches: Iterable, mesh, *,
                     prefetch: int = 2,
                     on_batch: Optional[Callable[[int], None]] = None,
                     stop_requested: Optional[Callable[[], bool]] = None
                     ) -> Optional[Dict[str, float]]:
  """accuracy, top5, loss, examples and nan_rows of one pass; None if stopped.

  `step_fn` is `eval_step` or `real_step` (no top5 or loss). The sums are
  added on the host: an eager add of global arrays is a computation every
  process must dispatch in the same order.
  """
  totals = None
  for i, batch in enumerate(sharding.prefetch(batches, mesh, prefetch), 1):
    if stop_requested is not None and stop_requested():
      return None
    sums = sharding.to_host(step_fn(params, batch))
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    if on_batch is not None:
      on_batch(i)
  if totals is None:
    raise ValueError('The eval data set yielded no batch; check eval_split.')
  count = max(float(totals['count']), 1.0)
  scores = {'accuracy': float(totals['correct']) / count,
            'examples': int(totals['count']),
            'nan_rows': int(totals['nan_rows'])}
  if 'top5' in totals:  # Not in ReaL's sums.
    scores.update(top5=float(totals['top5']) / count,
                  loss=float(totals['loss_sum']) / count)
  return scores


def nan_note(nan_rows: int) -> str:
  """What an eval's log line adds when some logits were NaN ('' if none)."""
  return (f'; {nan_rows} examples with NaN logits (scored as argmax does: '
          'the first NaN class)' if nan_rows else '')


def entry_source(config, entry, run_source=None):
  """(source, split) that an entry of config.evals scores.

  No `dataset` and the default `label_key`: the run's own data (a folder or
  the digits included); otherwise a TFDS data set and its label feature.
  """
  dataset = entry.dataset or config.dataset
  split = entry.split or config.eval_split
  if dataset == config.dataset and entry.label_key == 'label':
    return run_source or sources.get_source(config), split
  return sources.TfdsSource(dataset, config.data_dir,
                            label_key=entry.label_key), split


def _prefix(name: str) -> str:
  """What the metrics of entry `name` are called: prefix + 'accuracy'."""
  return {MAIN_EVAL: 'eval_', EMA_EVAL: 'ema/eval_'}.get(name, f'{name}/')


class Evaluations:
  """Runs the evaluations due at a step; keeps the main eval's results.

  `best` and `last` are of the main eval (`improved`: by the latest `run`),
  `accuracies` the latest of every other entry.
  """

  def __init__(self, config, functions: compiled.RunFunctions,
               num_train_steps: int,
               stop_requested: Optional[Callable[[], bool]] = None, *,
               best: Optional[float] = None, last: Optional[dict] = None):
    self.config = config
    self.functions = functions
    self.mesh = functions.mesh
    self.num_train_steps = num_train_steps
    self.stop_requested = stop_requested or (lambda: False)
    self.entries = dict(config.evals.items())
    self.best, self.last = best, dict(last or {})
    self.improved, self.accuracies = False, {}

  def due(self, step: int) -> List[str]:
    """Names of the evaluations to run after `step`, in order."""
    last = step == self.num_train_steps
    main = ([MAIN_EVAL] + [EMA_EVAL] * (self.config.ema_decay > 0)
            if last or step % self.config.eval_every_steps == 0 else [])
    # every_steps -1: only at the last step (a figure reported once: test).
    return main + [
        name for name, entry in self.entries.items()
        if last or (entry.every_steps != -1 and step % (
            entry.every_steps or self.config.eval_every_steps) == 0)]

  def run(self, names: List[str], state, step: int, writer) -> List[str]:
    """Runs, writes and prints `names`; those a stop request left."""
    self.improved = False
    for i, name in enumerate(names):
      metrics = self.run_one(name, state.ema_params if name == EMA_EVAL
                             else state.params)
      if metrics is None:
        return list(names[i:])
      writer.write_scalars(step, metrics)
      prefix = _prefix(name)
      if name == MAIN_EVAL:
        accuracy = metrics['eval_accuracy']
        self.improved = self.best is None or accuracy > self.best
        self.best = max(self.best or 0.0, accuracy)
        self.last = metrics
      else:
        self.accuracies.update(
            {k: v for k, v in metrics.items() if 'accuracy' in k})
      if name in (MAIN_EVAL, EMA_EVAL):
        line = (f'{"EMA eval" if name else "eval"} accuracy '
                f'{metrics[prefix + "accuracy"]:.4f}, loss '
                f'{metrics[prefix + "loss"]:.4f}'
                + (f' (best {self.best:.4f})' if name == MAIN_EVAL else ''))
      else:
        line = ', '.join(f'{k} {v:.4f}' for k, v in metrics.items()
                         if 'accuracy' in k)
      reporting.log_and_print(f'step {step}: {line}' + nan_note(
          metrics.get(prefix + 'nan_rows', 0)))
    return []

  def run_one(self, name: str, params) -> Optional[Dict[str, float]]:
    """The metrics of evaluation `name`; None when a stop cut it short."""
    config, entry = self.config, self.entries.get(name)
    step_fn = self.functions.eval_step
    if entry is None:  # MAIN_EVAL, EMA_EVAL.
      batches = input_pipeline.eval_dataset(config)
    elif entry.kind == 'fewshot':
      return self._fewshot(name, entry, params)
    else:
      source, split = entry_source(config, entry)
      num_classes = self.functions.model.num_classes
      if source.num_classes > num_classes:
        raise ValueError(f'config.evals.{name}: {source.num_classes} classes '
                         f'in the data but the head has {num_classes}.')
      batches = input_pipeline.eval_batches(
          source, split, batch_size=config.batch_size,
          image_size=config.image_size, num_classes=num_classes,
          multi_label=entry.kind == 'real', **self._pp(entry))
      if entry.kind == 'real':
        step_fn = self.functions.real_step
    scores = evaluate_dataset(step_fn, params, batches.as_numpy_iterator(),
                              self.mesh, prefetch=config.prefetch_batches,
                              stop_requested=self.stop_requested)
    return None if scores is None else {_prefix(name) + k: v
                                        for k, v in scores.items()}

  def _pp(self, entry):
    pp = self.config.pp
    return dict(crop=entry.crop or pp.eval_crop,
                resize=entry.resize or pp.eval_resize,
                resize_method=entry.resize_method or pp.eval_resize_method)

  def _fewshot(self, name, entry, params) -> Optional[Dict[str, float]]:
    results = linear_probe.evaluate_datasets(
        self.functions.features_step, compiled.without_head(params),
        dict(entry.fewshot_datasets.items()),
        mesh=self.mesh, data_dir=self.config.data_dir,
        batch_size=self.config.batch_size, image_size=self.config.image_size,
        shots=entry.shots, l2_reg=entry.l2_reg, num_seeds=entry.num_seeds,
        seed=0, stop_requested=self.stop_requested, **self._pp(entry))
    if results is None:
      return None
    return {f'{name}/{dataset}_{k}shot_accuracy': float(np.mean(accs))
            for dataset, by_shots in results.items()
            for k, accs in by_shots.items()}
