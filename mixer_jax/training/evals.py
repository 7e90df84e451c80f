"""The further evaluations of a training run: `config.evals`.

`config.evals` maps a name to a `configs/common.eval_entry(...)`; after
each step the training loop runs `Evaluations.run_one(name, params)` for
each entry that is `due(step)` (every `every_steps` steps, and at the last
step), which returns metrics named `<name>/...`, written to TensorBoard and
metrics.jsonl like every other metric:

  classification  `<name>/accuracy` (top-1), `<name>/top5`, `<name>/loss`,
                  `<name>/examples` of the model's head on (dataset, split);
  real            `<name>/accuracy`, `<name>/examples`: ImageNet ReaL, where
                  the top-1 class is correct when it is in the image's set of
                  labels (`label_key`, 'real_label' for imagenet2012_real);
                  images with an empty set are left out;
  fewshot         `<name>/<set>_<k>shot_accuracy` (mean over seeds) for each
                  set of `fewshot_datasets` and each k of `shots`: linear
                  probes on the frozen pre-logits (mixer_jax/training/linear_probe.py).

Batches are padded with mask 0, so every example is scored exactly once.
Every step comes from the run's `compiled.RunFunctions`, so it takes the
parameters as the trainer places them (replicated or fsdp). A stop request
(`stop_requested()`, SIGTERM) is checked between entries, data sets and
batches: the evaluation then returns None, and the trainer saves first.
"""

from typing import Callable, Dict, Iterable, Optional

import jax
import numpy as np

from mixer_jax.data import input_pipeline
from mixer_jax.training import compiled
from mixer_jax.training import eval_entries
from mixer_jax.training import linear_probe
from mixer_jax.training import sharding


def _sums(step_fn, params, batches, mesh, prefetch, on_batch=None,
          stop_requested=None):
  """Summed outputs of `step_fn` over `batches`; None if asked to stop.

  Each batch's sums (replicated scalars) are read back and added on the
  host: an eager add of global arrays is a computation every process must
  dispatch in the same order, and in multi-process runs beside the
  prefetch thread it could deadlock.
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
  return totals


def evaluate_dataset(p_eval_step, params, batches: Iterable, mesh, *,
                     prefetch: int = 2,
                     on_batch: Optional[Callable[[int], None]] = None,
                     stop_requested: Optional[Callable[[], bool]] = None
                     ) -> Optional[Dict[str, float]]:
  """Top-1, top-5, mean loss and example count over one pass of `batches`.

  The one evaluation of the head: used by the training loop and by
  `python -m mixer_jax.evaluate`.

  Args:
    p_eval_step: `train_steps.eval_step` jitted over `mesh`.
    params: the model parameters (placed for p_eval_step).
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
  totals = _sums(p_eval_step, params, batches, mesh, prefetch, on_batch,
                 stop_requested)
  if totals is None:
    return None
  count = max(float(totals['count']), 1.0)
  return {'accuracy': float(totals['correct']) / count,
          'top5': float(totals['top5']) / count,
          'loss': float(totals['loss_sum']) / count,
          'examples': int(totals['count']),
          'nan_rows': int(totals['nan_rows'])}


def nan_note(nan_rows: int) -> str:
  """What an eval's log line adds when some logits were NaN ('' if none)."""
  return (f'; {nan_rows} examples with NaN logits (scored as argmax does: '
          'the first NaN class)' if nan_rows else '')


class Evaluations:
  """Runs the entries of config.evals that are due at a step."""

  def __init__(self, config, functions: compiled.RunFunctions,
               num_train_steps: int,
               stop_requested: Optional[Callable[[], bool]] = None):
    """Args: the run's config, its `compiled.build` functions, its length,
    and a stop-request check (None: never stop)."""
    self.config = config
    self.functions = functions
    self.model = functions.model
    self.mesh = functions.mesh
    self.num_train_steps = num_train_steps
    self.stop_requested = stop_requested or (lambda: False)
    self.entries = dict(config.evals.items()) if 'evals' in config else {}

  def _every(self, entry) -> int:
    return entry.every_steps or self.config.eval_every_steps

  def due(self, step: int):
    """Names of the entries to run after `step`."""
    last = step == self.num_train_steps
    # every_steps -1: only at the last step (a figure reported once: test).
    return [name for name, entry in self.entries.items()
            if last or (entry.every_steps != -1 and
                        step % self._every(entry) == 0)]

  def run(self, step: int, params) -> Dict[str, float]:
    """Metrics of every entry due at `step` ({} when none is).

    Raises RuntimeError if a stop is requested (use `run_one` to stop).
    """
    metrics = {}
    for name in self.due(step):
      result = self.run_one(name, params)
      if result is None:
        raise RuntimeError(f'config.evals.{name} stopped on request.')
      metrics.update(result)
    return metrics

  def _pp(self, entry):
    pp = self.config.pp
    return dict(crop=entry.crop or pp.eval_crop,
                resize=entry.resize or pp.eval_resize,
                resize_method=entry.resize_method or pp.eval_resize_method)

  def run_one(self, name: str, params) -> Optional[Dict[str, float]]:
    """Runs entry `name` now; its metrics, prefixed `name/`.

    None when a stop was requested before it finished.
    """
    entry = self.entries[name]
    if entry.kind == 'fewshot':
      return self._fewshot(name, entry, params)
    data = eval_entries.entry_data(self.config, entry)
    source = eval_entries.entry_source(self.config, data)
    num_classes = self.model.num_classes
    if source.num_classes > num_classes:
      raise ValueError(f'config.evals.{name}: {source.num_classes} classes '
                       f'in the data but the head has {num_classes}.')
    batches = input_pipeline.eval_batches(
        source, data.split, batch_size=self.config.batch_size,
        image_size=self.config.image_size, num_classes=num_classes,
        multi_label=entry.kind == 'real', **self._pp(entry))
    if entry.kind != 'real':
      result = evaluate_dataset(self.functions.eval_step, params,
                                batches.as_numpy_iterator(), self.mesh,
                                prefetch=self.config.prefetch_batches,
                                stop_requested=self.stop_requested)
      return None if result is None else {f'{name}/{k}': v
                                          for k, v in result.items()}
    totals = _sums(self.functions.real_step, params,
                   batches.as_numpy_iterator(), self.mesh,
                   self.config.prefetch_batches,
                   stop_requested=self.stop_requested)
    if totals is None:
      return None
    count = float(totals['count'])
    denominator = max(count, 1.0)
    return {f'{name}/accuracy': float(totals['correct']) / denominator,
            f'{name}/examples': int(count),
            f'{name}/nan_rows': int(totals['nan_rows'])}

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
    metrics = {}
    for dataset, by_shots in results.items():
      for k, accs in by_shots.items():
        metrics[f'{name}/{dataset}_{k}shot_accuracy'] = float(np.mean(accs))
    return metrics
