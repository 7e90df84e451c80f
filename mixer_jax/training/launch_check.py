"""The launch check (`train --check_only`, docs/parallelism.md).

`check(config)` resolves the config as `train_and_evaluate` does and
compiles, from abstract shapes, every function the run will call; it reads
only the data set's metadata and writes nothing.
"""

import dataclasses
import os
import types
from typing import Dict, List, Optional

import jax
import jax.numpy as jnp
import tensorflow_datasets as tfds

from mixer_jax import model_from_config
from mixer_jax import models
from mixer_jax.data import input_pipeline
from mixer_jax.data.datasets import sources
from mixer_jax.training import compiled
from mixer_jax.training import config_validation
from mixer_jax.training import cost
from mixer_jax.training import init_from_checks
from mixer_jax.training import optim
from mixer_jax.training import sharding
from mixer_jax.training import trainer
from mixer_jax.weights import registry

GIB = 2.0 ** 30


class LaunchCheckError(Exception):
  """A run that would fail: the message says which function and why."""


@dataclasses.dataclass
class Row:
  """What one compiled function costs per device (`cost.compiled_memory`)."""
  name: str
  used_by: str
  flops_fraction: Optional[float]
  collectives: Dict[str, Dict[str, int]]
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  total_bytes: int


@dataclasses.dataclass
class Plan:
  """The resolved run and one Row per compiled function."""
  variant: str
  num_params: int
  num_classes: int
  num_train_steps: Optional[int]
  mesh: Dict[str, int]
  sharding: str
  state_bytes_per_device: int
  notes: List[str]
  rows: List[Row]


def _init_from_note(config):
  """(config, note): init_from resolved when its file is here, else a note.

  The check downloads nothing: a registry or Hub name not in the local
  cache is noted, and the model keeps the config's sizes.
  """
  spec = config.init_from
  if not spec:
    return config, None
  local = os.path.exists(spec)
  if not local and not spec.startswith('hf-hub:'):
    try:
      local = os.path.exists(registry.local_path(registry.get(spec)))
    except registry.CheckpointNotFoundError:
      local = False
  if not local:
    return config, (f'init_from {spec}: not downloaded here, not checked '
                    '(the run checks it before compiling).')
  return init_from_checks.resolve_init_from(config, resuming=False), None


def _tfds_metadata(name: str, data_dir):
  """(builder, class count) from TFDS's metadata; prepares nothing."""
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError:
    raise sources.DatasetUnavailableError(
        f'TFDS knows no data set named {name!r}.') from None
  label = sources.class_label(builder.info)
  return builder, label.num_classes if label else -1


def _dataset_facts(config):
  """(head classes, train steps or None) from the data set's metadata."""
  if config.dataset == 'folder':  # Lists class folders; reads no image.
    source = sources.get_source(config)
    examples = source.num_examples(config.train_split)
  else:
    builder, classes = _tfds_metadata(config.dataset, config.data_dir)
    source = types.SimpleNamespace(name=config.dataset, num_classes=classes)
    examples = None
    if builder.is_prepared():
      try:
        examples = builder.info.splits[config.train_split].num_examples
      except Exception:  # pylint: disable=broad-except
        examples = None  # The run's data checks name a bad split.
  num_classes = input_pipeline.head_classes(config, source)
  if config.num_train_steps > 0:
    return num_classes, int(config.num_train_steps)
  if not examples:
    return num_classes, None  # Not prepared here: split sizes unknown.
  return num_classes, trainer.num_train_steps_for(config, examples)


def _batch(functions, batch_size, image_size, num_classes, mask):
  """Abstract global batch as the input pipeline makes it (all float32)."""
  data = sharding.batch_sharding(functions.mesh)
  batch = {'image': jax.ShapeDtypeStruct(
               (batch_size, image_size, image_size, 3), jnp.float32,
               sharding=data),
           'label': jax.ShapeDtypeStruct((batch_size, num_classes),
                                         jnp.float32, sharding=data)}
  if mask:
    batch['mask'] = jax.ShapeDtypeStruct((batch_size,), jnp.float32,
                                         sharding=data)
  return batch


def _row(name, used_by, jitted, args, model_flops):
  try:
    executable = jitted.lower(*args).compile()
  except Exception as e:  # pylint: disable=broad-except
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise LaunchCheckError(f'{name} ({used_by}) does not compile: '
                           f'{type(e).__name__}: {first}') from None
  memory = executable.memory_analysis()
  sizes = [getattr(memory, f'{k}_size_in_bytes', 0)
           for k in ('argument', 'output', 'temp')]
  sizes.append(cost.compiled_memory(executable) or 0)
  fraction = (cost.compiled_flops(executable) / model_flops
              if model_flops else None)
  return Row(name, used_by, fraction,
             cost.collective_stats(executable.as_text()), *sizes)


def check(config, *, mesh=None) -> Plan:
  """Resolves `config` as a run would and compiles each of its functions."""
  config_validation.validate_config(config, num_devices=jax.device_count(),
                                    num_processes=jax.process_count())
  config, note = _init_from_note(config)
  num_classes, num_train_steps = _dataset_facts(config)
  schedule_steps = num_train_steps or config.warmup_steps + 1
  if num_train_steps:
    config_validation.check_schedule(config, num_train_steps)
  mesh = mesh or trainer.create_mesh(config)
  model = model_from_config.create_model(config, num_classes)
  functions = compiled.build(
      config, model, mesh, tx=optim.create_optimizer(config, schedule_steps),
      num_train_steps=schedule_steps)
  size, batch = config.image_size, config.batch_size
  forward = models.flops_per_image(model, size) * batch
  features = models.flops_per_image(model.clone(num_classes=None),
                                    size) * batch
  rows = [
      _row('init', 'start of a fresh run', functions.init_fn,
           (jax.ShapeDtypeStruct((2,), jnp.uint32),), None),
      # XLA's cost analysis counts a loop body once: with accumulation, the
      # step's count is that of one micro-batch.
      _row('train_step', 'training' + (
          f' (FLOPs of 1 of {config.grad_accum_steps} micro-batches)'
          if config.grad_accum_steps > 1 else ''), functions.train_step,
           (functions.abstract_state,
            _batch(functions, batch, size, num_classes, False)),
           3 * forward / config.grad_accum_steps)]
  entries = dict(config.evals.items())
  users = {'classification': ['eval_split'], 'real': []}
  fewshot_users = []
  for name, entry in entries.items():
    if entry.kind == 'fewshot':
      for set_name, spec in entry.fewshot_datasets.items():
        _tfds_metadata(spec[0], config.data_dir)  # The name must exist.
        fewshot_users.append(f'{name}/{set_name}')
    else:
      users[entry.kind].append(f'evals.{name}')
  eval_batch = _batch(functions, batch, size, num_classes, True)
  rows.append(_row('eval_step', ', '.join(users['classification']),
                   functions.eval_step,
                   (functions.abstract_params, eval_batch), forward))
  if users['real']:
    rows.append(_row('real_step', ', '.join(users['real']),
                     functions.real_step,
                     (functions.abstract_params, eval_batch), forward))
  if fewshot_users:
    images = _batch(functions, batch, size, 1, False)['image']
    rows.append(_row('features_step', ', '.join(fewshot_users),
                     functions.features_step,
                     (compiled.without_head(functions.abstract_params),
                      images), features))
  return Plan(
      variant=config.model.variant,
      num_params=models.count_params(functions.abstract_params),
      num_classes=num_classes, num_train_steps=num_train_steps,
      mesh=dict(mesh.shape), sharding=config.sharding,
      state_bytes_per_device=cost.state_bytes_per_device(
          functions.abstract_state),
      notes=[note] if note else [], rows=rows)


def _collectives_text(stats) -> str:
  if not stats:
    return '-'
  return ', '.join(f'{kind} {s["count"]}x {s["bytes"] / 2**20:.1f}M'
                   for kind, s in stats.items())


def format_plan(plan: Plan, device_memory_gib: Optional[float] = None,
                source: str = '') -> str:
  """The plan as text: a header and one row per function."""
  mesh = ' x '.join(f'{k}={v}' for k, v in plan.mesh.items())
  steps = (f'{plan.num_train_steps:,} steps' if plan.num_train_steps
           else 'steps unknown (split sizes not prepared)')
  lines = [f'Launch check {source}: Mixer {plan.variant}, '
           f'{plan.num_params:,} parameters, {plan.num_classes} classes, '
           f'{steps}; mesh {mesh}, sharding {plan.sharding}, state '
           f'{plan.state_bytes_per_device / 2**20:,.1f} MiB per device.']
  lines += plan.notes
  header = ['function', 'FLOPs/dev', 'args MiB', 'out MiB', 'temp MiB',
            'collectives (count, MiB)', 'used by']
  if device_memory_gib:
    header.insert(5, f'fits {device_memory_gib:g} GiB')
  body = []
  for r in plan.rows:
    cells = [r.name, '-' if r.flops_fraction is None
             else f'{r.flops_fraction:.3f}',
             f'{r.argument_bytes / 2**20:,.1f}',
             f'{r.output_bytes / 2**20:,.1f}',
             f'{r.temp_bytes / 2**20:,.1f}',
             _collectives_text(r.collectives), r.used_by]
    if device_memory_gib:
      cells.insert(5, 'yes' if r.total_bytes <= device_memory_gib * GIB
                   else f'NO ({r.total_bytes / GIB:.1f} GiB)')
    body.append(cells)
  widths = [max(len(h), *(len(b[i]) for b in body))
            for i, h in enumerate(header)]
  for cells in [header] + body:
    lines.append('  '.join(c.ljust(w) for c, w in zip(cells, widths))
                 .rstrip())
  return '\n'.join(lines)


def fits(plan: Plan, device_memory_gib: Optional[float]) -> bool:
  """Whether every function fits `device_memory_gib` (True without one)."""
  return not device_memory_gib or all(
      r.total_bytes <= device_memory_gib * GIB for r in plan.rows)

