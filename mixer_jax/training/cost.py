"""What a compiled step costs: collectives in its HLO, FLOPs, memory, state.
"""

import collections
import os
import re
from typing import Optional, Tuple

import jax
import numpy as np

COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all',
               'collective-permute')

_RESULT_RE = re.compile(r' = (.+?) (' + '|'.join(COLLECTIVES) +
                        r')(?:-start)?\(')
_SHAPE_RE = re.compile(r'\b([a-z]\w*)\[([\d,]*)\]')


def collective_stats(hlo_text: str) -> dict[str, dict[str, int]]:
  """Count and total result bytes of each collective in optimized HLO text.

  An asynchronous pair (`all-reduce-start` / `-done`) counts once; a
  combined collective with a tuple result counts once with all its bytes.
  """
  stats = collections.defaultdict(lambda: {'count': 0, 'bytes': 0})
  for line in hlo_text.splitlines():
    match = _RESULT_RE.search(line)
    if not match:
      continue
    nbytes = 0
    for dtype, dims in _SHAPE_RE.findall(match.group(1)):
      # HLO names types by their bits: f32, bf16, s8, f8e4m3fn; pred is 1 byte.
      bits = re.match(r'[a-z]+(\d+)', dtype)
      itemsize = int(bits.group(1)) // 8 if bits else 1
      nbytes += itemsize * int(np.prod([int(d) for d in dims.split(',')
                                        if d]))
    stats[match.group(2)]['count'] += 1
    stats[match.group(2)]['bytes'] += nbytes
  return {kind: dict(stats[kind]) for kind in COLLECTIVES if kind in stats}


def state_bytes_per_device(tree) -> int:
  """Bytes one device holds of a tree of placed arrays (or sharded structs)."""
  return int(sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                 for x in jax.tree.leaves(tree)))


def device_memory(device) -> Optional[Tuple[int, str]]:
  """(bytes, whose) of the memory `device` can use; None when unknown."""
  if device.platform == 'cpu':
    return (os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'),
            'this host')
  limit = (device.memory_stats() or {}).get('bytes_limit')
  return (int(limit), f'one {device.device_kind}') if limit else None


def compiled_memory(compiled) -> Optional[int]:
  """Bytes the compiled executable needs per device (None if unknown)."""
  memory = compiled.memory_analysis()
  if memory is None:
    return None
  return (memory.argument_size_in_bytes + memory.output_size_in_bytes +
          memory.temp_size_in_bytes - memory.alias_size_in_bytes)


def compiled_flops(compiled) -> float:
  """FLOPs per device XLA counts for the compiled executable."""
  return float((compiled.cost_analysis() or {}).get('flops', 0.0))
