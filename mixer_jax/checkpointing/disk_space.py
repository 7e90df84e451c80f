"""Refuses a save that would not fit on the disk, before writing anything."""

import shutil

import jax
import numpy as np

from mixer_jax.checkpointing.checkpoint_checks import CheckpointError

# Fraction of headroom required on the disk above the state's size.
_SPACE_MARGIN = 1.1


def check_space(state, step, directory, all_steps):
  """Fails early when `state` would not fit on the local disk."""
  need = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(state) if hasattr(x, 'shape'))
  free = shutil.disk_usage(directory).free
  if free < need * _SPACE_MARGIN:
    raise CheckpointError(
        f'Not enough disk space to save step {step} in {directory}: '
        f'needs about {need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free. '
        f'Kept steps {all_steps()} are untouched; free space or lower '
        '--config.keep_checkpoints, then restart to resume.')
