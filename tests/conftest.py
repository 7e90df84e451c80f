"""Test-wide settings: 8 fake CPU devices, quiet TensorFlow, one XLA cache.

XLA reads the device count once, when JAX first starts its CPU backend, so
this must run before any test imports jax.

Many tests (and the programs they start as subprocesses) compile the same
small train and eval steps; JAX's persistent compilation cache, shared by
the pytest workers and their subprocesses through the environment, compiles
each once. Its keys hold the computation, the JAX version and the XLA
flags, so an entry is only reused for the same program.
"""

import os
import tempfile

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') +
    ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    tempfile.gettempdir(), 'mixer_jax_tests_xla_cache'))
# The tests' compilations are small: cache them all, not only the slow ones.
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
