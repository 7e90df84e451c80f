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
import signal
import tempfile

import pytest

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

if os.environ.get('PYTEST_XDIST_WORKER'):
  # Ctrl-C reaches every process of the terminal's job: a worker ends at
  # once and the controller reports. Python's KeyboardInterrupt would be
  # lost inside a garbage-collection callback, or taken by a training test
  # as a request to save and stop, leaving the worker running on.
  signal.signal(signal.SIGINT, lambda *_: os._exit(2))


# `pytest -m quick -n 2 tests`: the model, weight formats, preprocessing,
# configs, sharding and the programs' output, in under 2 minutes on 2 cores;
# the whole suite before a change lands.
QUICK_FILES = (
    'test_command_line.py', 'test_compiled.py', 'test_config_loading.py',
    'test_configs.py', 'test_hub.py', 'test_image_alpha.py',
    'test_import_graph.py', 'test_models.py', 'test_official_format.py',
    'test_optim.py', 'test_preprocess.py', 'test_pretrained.py',
    'test_randaugment.py', 'test_registry.py', 'test_reporting.py',
    'test_sharding.py', 'test_timm_format.py')


@pytest.hookimpl(tryfirst=True)  # Before `-m` selects by marker.
def pytest_collection_modifyitems(items):
  for item in items:
    if (item.path.name in QUICK_FILES and
        item.get_closest_marker('slow') is None):
      item.add_marker(pytest.mark.quick)


def _say(config, text):
  config.pluginmanager.get_plugin('terminalreporter').write_line(text)


# pytest-xdist's workers import JAX, TensorFlow and every test module before
# the first result, silently under -q; say what is happening.
@pytest.hookimpl(optionalhook=True)
def pytest_xdist_setupnodes(config, specs):
  _say(config, f'Starting {len(specs)} workers: each imports JAX, TensorFlow '
       'and the test modules first (about 20 s on 2 free cores).')


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
  _say(node.config, f'[{node.gateway.id}] {len(ids)} tests collected.')
