"""Runs real timm (PyTorch) in a child process, for tests that compare with it.

PyTorch and TensorFlow loaded into one process can crash it (their bundled
native libraries clash), and test processes load TensorFlow through the
data and export code. So timm runs in a fresh interpreter that imports
neither TensorFlow nor mixer_jax: arrays go in and out as `.npz` files.
"""

import importlib.util
import os
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest

AVAILABLE = all(importlib.util.find_spec(name) is not None
                for name in ('torch', 'timm'))
needs_timm = pytest.mark.skipif(
    not AVAILABLE, reason="torch and timm not installed (pip install -e "
    "'.[timm]')")


def run(code: str, **arrays) -> dict:
  """Runs `code` with torch, timm, np and the inputs; returns its outputs.

  `code` sees `inputs` (a dict of the given arrays) and fills `outputs`
  (a dict of arrays); `TIMM_PROCESS_ENV` variables pass through (e.g. the
  Hugging Face cache settings).
  """
  with tempfile.TemporaryDirectory() as tmp:
    src, dst = os.path.join(tmp, 'in.npz'), os.path.join(tmp, 'out.npz')
    np.savez(src, **arrays)
    script = (
        'import numpy as np, torch, timm\n'
        f'inputs = dict(np.load({src!r}))\noutputs = {{}}\n'
        + textwrap.dedent(code) +
        f'\nnp.savez({dst!r}, **outputs)\n')
    result = subprocess.run([sys.executable, '-c', script],
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ), check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(np.load(dst))
