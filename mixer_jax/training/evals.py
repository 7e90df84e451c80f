"""The evaluations of a training run, each an entry with a name.

After each step the loop runs the entries `due(step)` (`Evaluations.run`),
which writes each one's metrics (TensorBoard, metrics.jsonl) as it ends:

  MAIN_EVAL       `eval_accuracy` (top-1), `eval_top5`, `eval_loss`,
                  `eval_examples` on config.eval_split, every
                  eval_every_steps steps and at the last step;
  EMA_EVAL        the same as `ema/eval_*`, of the EMA of the parameters
                  (config.ema_decay > 0);
  config.evals    name -> `eval_entry(...)` (every `every_steps` steps and
                  at the last step), by kind: classification (`<name>/
                  accuracy`, `top5`, `loss`, `examples` of the head on
                  (dataset, split)); real (`<name>/accuracy`, `examples`:
                  ImageNet ReaL, top-1 correct when in the image's label set;
                  empty sets left out); fewshot (`<name>/<set>_<k>shot_
                  accuracy`, mean over seeds: linear probes on the frozen
                  pre-logits, linear_probe.py).

Batches are padded with mask 0, so every example is scored exactly once.
Every step comes from the run's `compiled.RunFunctions`, so it takes the
parameters as the trainer places them. A stop request (SIGTERM) is checked
between entries, data sets and batches: the entries left are returned, and
the trainer saves first.
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
  """Top-1, top-5, mean loss and example count over one pass of `batches`.

  The one evaluation of the head: used by the training loop and by
  `python -m mixer_jax.evaluate`. Each batch's sums (replicated scalars) are
  read back and added on the host: an eager add of global arrays is a
  computation every process must dispatch in the same order.

  Args:
    step_fn: the run's `eval_step` (or `real_step`: no top-5 or loss).
    params: the model parameters (placed for step_fn).
    batches: host batches with 'image', 'label' and 'mask' (padding 0, so
      every example is counted once).
    mesh: the device mesh the batches are sharded over.
    prefetch: batches in flight (`sharding.prefetch`).
    on_batch: called with the number of batches done after each one.
    stop_requested: checked before each batch; True abandons the pass.

  Returns:
    Dict with 'accuracy', 'top5', 'loss', 'examples' and 'nan_rows' (the
    examples whose logits hold a NaN; scored by argmax's rule, the first
    NaN class); None when stopped.
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

  An entry with no `dataset` and the default `label_key` scores the run's
  own data set (`run_source` when open; a folder or the built-in digits
  included); any other names a TFDS data set and a label feature of it
  (`real_label` for ImageNet ReaL: a set of labels per image). An empty
  `split` is config.eval_split. ValueError for a label_key the data set
  does not have.
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

  Attributes:
    best: the best main eval accuracy so far (None before the first).
    last: the metrics of the latest main eval ({} before the first).
    improved: whether the latest `run` improved on `best`.
    accuracies: the latest accuracy of every other entry this process ran.
  """

  def __init__(self, config, functions: compiled.RunFunctions,
               num_train_steps: int,
               stop_requested: Optional[Callable[[], bool]] = None, *,
               best: Optional[float] = None, last: Optional[dict] = None):
    """Args: the run's config, its `compiled.build` functions, its length,
    a stop-request check (None: never stop), and the best and latest main
    eval of a resumed run."""
    self.config = config
    self.functions = functions
    self.mesh = functions.mesh
    self.num_train_steps = num_train_steps
    self.stop_requested = stop_requested or (lambda: False)
    self.entries = dict(config.evals.items()) if 'evals' in config else {}
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
    """Runs `names` on `state`, writing and printing each one's metrics.

    Returns:
      The names not run because a stop was requested ([] when all ran).
    """
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
    """Runs evaluation `name` now; its metrics (see the module docstring).

    None when a stop was requested before it finished.
    """
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
