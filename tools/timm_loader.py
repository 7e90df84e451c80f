"""timm's training loader on an image folder, for `benchmark --mode=input`.

  python tools/timm_loader.py FOLDER RECIPE SIZE BATCH WORKERS NUM WARMUP

ImageFolder(FOLDER/train) through `timm.data.create_transform(SIZE,
is_training=True)` (plus `auto_augment='rand-m15-n2'` for RECIPE
'inception'), a DataLoader of WORKERS workers; after WARMUP batches, times
NUM and prints images/s and images per CPU-second of this process and its
workers (psutil counts them; 'nan' without psutil). A child process of the
benchmark: PyTorch and TensorFlow in one process can crash it.
"""

import itertools
import math
import os
import sys
import time

import timm.data
import torch
import torchvision

try:
  import psutil  # pylint: disable=g-import-not-at-top
except ImportError:
  psutil = None


def cpu_seconds():
  if psutil is None:
    return math.nan
  me = psutil.Process()
  return sum(sum(p.cpu_times()[:2])
             for p in [me] + me.children(recursive=True))


def main(folder, recipe, *numbers):
  size, batch, workers, num, warmup = map(int, numbers)
  transform = timm.data.create_transform(
      size, is_training=True,
      auto_augment='rand-m15-n2' if recipe == 'inception' else None)
  data = torchvision.datasets.ImageFolder(os.path.join(folder, 'train'),
                                          transform=transform)
  loader = torch.utils.data.DataLoader(
      data, batch_size=batch, shuffle=True, num_workers=workers,
      drop_last=True, persistent_workers=workers > 0)
  batches = itertools.chain.from_iterable(itertools.repeat(loader))
  for _ in range(warmup):
    next(batches)
  start, used = time.perf_counter(), cpu_seconds()
  for _ in range(num):
    next(batches)
  print(num * batch / (time.perf_counter() - start),
        num * batch / (cpu_seconds() - used))


if __name__ == '__main__':
  main(*sys.argv[1:])
