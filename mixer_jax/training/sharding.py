"""Where arrays live: the device mesh, shardings and the multi-host start.

The one place that makes meshes and decides placement; `config.mesh` and
`config.sharding` are described in docs/parallelism.md.
"""

import collections
from typing import Iterable, Iterator, Optional, Sequence

from absl import flags
from absl import logging
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np

DATA_AXIS = 'data'
FSDP_AXIS = 'fsdp'
DEFAULT_MESH = ((DATA_AXIS, -1),)


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
  """Starts JAX's multi-host runtime; call before any other JAX use.

  With no arguments JAX detects the cluster (TPU pods, SLURM, Open MPI,
  Kubernetes); a second call is a no-op.
  """
  if jax.distributed.is_initialized():
    return
  kwargs = {}
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError('With a coordinator address also give num_processes '
                       'and process_id (or neither, to let JAX detect them).')
    kwargs = dict(coordinator_address=coordinator_address,
                  num_processes=num_processes, process_id=process_id)
  # CPU processes exchange collectives through gloo; the setting only
  # affects the CPU backend, so it is harmless on GPU and TPU hosts.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(**kwargs)
  logging.info('jax.distributed: process %d of %d, %d local / %d devices.',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def mesh_shape(axes, num_devices: int):
  """(names, sizes) of `axes` ((name, size) pairs, one size may be -1)."""
  axes = [(str(name), int(size)) for name, size in axes]
  names = [name for name, _ in axes]
  if not names or len(set(names)) != len(names) or not set(names) <= {
      DATA_AXIS, FSDP_AXIS}:
    raise ValueError(f'config.mesh={tuple(axes)}: use distinct axes named '
                     f"'{DATA_AXIS}' and '{FSDP_AXIS}', e.g. "
                     "(('data', -1), ('fsdp', 4)).")
  fixed = int(np.prod([size for _, size in axes if size != -1]))
  free = [name for name, size in axes if size == -1]
  if len(free) > 1 or any(size == 0 or size < -1 for _, size in axes):
    raise ValueError(f'config.mesh={tuple(axes)}: sizes must be positive, '
                     'with at most one -1 (the remaining devices).')
  if num_devices % fixed or (not free and fixed != num_devices):
    raise ValueError(f'config.mesh={tuple(axes)} needs a multiple of {fixed} '
                     f'devices{"" if free else " exactly"}, but there are '
                     f'{num_devices}.')
  sizes = [num_devices // fixed if size == -1 else size for _, size in axes]
  return tuple(names), tuple(sizes)


def create_mesh(devices: Optional[Sequence[jax.Device]] = None,
                axes=DEFAULT_MESH) -> Mesh:
  """The mesh of `axes` over `devices` (default: all, in JAX's order).

  A host's devices are consecutive, so the last axis stays within a host.
  """
  devices = jax.devices() if devices is None else list(devices)
  names, sizes = mesh_shape(axes, len(devices))
  return Mesh(np.asarray(devices).reshape(sizes), names)


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding that keeps a full copy on every device (params, opt state)."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding that splits the leading (batch) axis over every mesh axis."""
  return NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))


def fsdp_spec(shape: Sequence[int], num_shards: int,
              axis_name: str = DATA_AXIS) -> PartitionSpec:
  """Splits the largest axis of `shape` that `num_shards` divides.

  Arrays with no such axis (scalars, odd sizes) stay replicated.
  """
  if num_shards > 1:
    for axis in sorted(range(len(shape)), key=lambda i: -shape[i]):
      if shape[axis] % num_shards == 0:
        spec = [None] * len(shape)
        spec[axis] = axis_name
        return PartitionSpec(*spec)
  return PartitionSpec()


def state_shardings(tree, mesh: Mesh, strategy: str,
                    min_size_mb: float = 0.0):
  """`NamedSharding`s of a state (or params) tree under `strategy`.

  fsdp leaves arrays of at most `min_size_mb` MiB replicated.
  """
  if strategy == 'replicate':
    return jax.tree.map(lambda _: replicated(mesh), tree)
  axis = FSDP_AXIS if FSDP_AXIS in mesh.axis_names else DATA_AXIS

  def place(x):
    nbytes = np.prod(x.shape) * np.dtype(x.dtype).itemsize
    if nbytes <= min_size_mb * 2**20:
      return replicated(mesh)
    return NamedSharding(mesh, fsdp_spec(x.shape, mesh.shape[axis], axis))
  return jax.tree.map(place, tree)


def put(tree, shardings):
  """Places a host pytree (identical on every process) with `shardings`.

  Each process fills only the shards of its own devices, so this works on
  multi-host meshes without a cross-host transfer.
  """
  def place(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
  return jax.tree.map(place, tree, shardings)


def replicate(tree, mesh: Mesh):
  """`put` with a full copy on every device of `mesh`."""
  return put(tree, state_shardings(tree, mesh, 'replicate'))


def to_host(tree):
  """Copies global arrays (replicated or sharded) to numpy on every host.

  A replicated array is read from its first local shard (no transfer); an
  array split over several hosts is gathered from all of them.
  """
  def get(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return np.asarray(x)
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(get, tree)


def shard_batch(batch, mesh: Mesh):
  """Global arrays of the batch, from this host's share of it."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      batch)


def prefetch(batches: Iterable, mesh: Mesh, size: int = 2) -> Iterator:
  """Yields `shard_batch(b)` of each host batch, `size` batches ahead.

  As flax's `prefetch_to_device`: dispatch is asynchronous, so the next
  transfers run while the current step does.
  """
  ahead = collections.deque()
  for batch in batches:
    ahead.append(shard_batch(batch, mesh))
    if len(ahead) > size:
      yield ahead.popleft()
  yield from ahead


def define_multihost_flags():
  """Defines the multi-host start flags of the command-line programs."""
  flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize() '
                    'with cluster auto-detection (TPU pods, SLURM, ...).')
  flags.DEFINE_string('coordinator_address', None,
                      'host:port of process 0, for a manual multi-host start.')
  flags.DEFINE_integer('num_processes', None, 'Processes (with '
                       '--coordinator_address).')
  flags.DEFINE_integer('process_id', None, 'This process (with '
                       '--coordinator_address).')


def initialize_from_flags():
  """Starts jax.distributed when `--multihost` or `--coordinator_address`
  (flags of `define_multihost_flags`) ask for it; else does nothing."""
  f = flags.FLAGS
  if f.coordinator_address or f.multihost:
    initialize_distributed(f.coordinator_address, f.num_processes,
                           f.process_id)
