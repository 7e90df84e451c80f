"""Test-wide settings: 8 fake CPU devices, quiet TensorFlow.

XLA reads the device count once, when JAX first starts its CPU backend, so
this must run before any test imports jax.
"""

import os

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') +
    ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
