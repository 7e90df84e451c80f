"""Two processes on 127.0.0.1 (jax.distributed, gloo) train like one process.

Each worker has 4 fake CPU devices, so the 2-process mesh has 8 devices, the
same as this test process. The workers run the real `train_and_evaluate`
(each process feeding its own half of every global batch, as on a pod); the
reference replays the same global batches (both processes' halves,
concatenated in process order) through the jitted step here.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest

from configs import quickstart
from mixer_jax import model_from_config
from mixer_jax.data import input_pipeline
from mixer_jax.training import compiled
from mixer_jax.training import optim
from mixer_jax.training import sharding
import run_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 4

WORKER = textwrap.dedent('''
    import json, os, sys
    import ml_collections
    from mixer_jax.training import sharding
    process_id, port, config_json, workdir = sys.argv[1:5]
    sharding.initialize_distributed(f'127.0.0.1:{port}', 2, int(process_id))
    from mixer_jax.training import trainer
    config = ml_collections.ConfigDict(json.loads(config_json))
    summary = trainer.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, f'summary_{process_id}.json'), 'w') as f:
      json.dump(summary, f)
''')


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def make_config(data_dir):
  config = quickstart.get_config()
  config.data_dir = data_dir
  config.model.num_blocks, config.model.hidden_dim = 1, 16
  config.model.tokens_mlp_dim, config.model.channels_mlp_dim = 8, 32
  config.batch_size, config.warmup_steps = 32, 1
  config.num_train_steps = NUM_STEPS
  config.optimizer, config.b1, config.learning_rate = 'sgd', 0.9, 0.1
  config.model.stochastic_depth = 0.2  # Random numbers must agree too.
  config.log_every_steps = config.eval_every_steps = NUM_STEPS
  config.checkpoint_every_steps = NUM_STEPS
  return config


def reference_run(config):
  """Single process, 8 devices, the 2-process run's global batches."""
  mesh = sharding.create_mesh()
  model = model_from_config.create_model(config, 10)
  tx = optim.create_optimizer(config, NUM_STEPS)
  steps = compiled.build(config, model, mesh, tx=tx,
                         num_train_steps=NUM_STEPS)
  state = steps.init_fn(jax.random.PRNGKey(config.seed))
  streams = [input_pipeline.train_dataset(
      config, process_index=i, process_count=2).as_numpy_iterator()
             for i in range(2)]
  for _ in range(NUM_STEPS):
    halves = [next(s) for s in streams]
    batch = jax.tree.map(lambda *x: np.concatenate(x), *halves)
    state, _ = steps.train_step(state, sharding.shard_batch(batch, mesh))
  evals = [list(input_pipeline.eval_dataset(
      config, process_index=i, process_count=2).as_numpy_iterator())
           for i in range(2)]
  correct = count = 0.0
  for halves in zip(*evals):
    batch = jax.tree.map(lambda *x: np.concatenate(x), *halves)
    sums = jax.device_get(steps.eval_step(state.params,
                                          sharding.shard_batch(batch, mesh)))
    correct, count = correct + sums['correct'], count + sums['count']
  return jax.device_get(state.params), correct / count


@pytest.mark.slow
def test_two_processes_agree_with_one(tmp_path):
  config = make_config(str(tmp_path / 'tfds'))
  input_pipeline.dataset_info(config)  # Builds digits once, before workers.
  workdir = tmp_path / 'run'
  # PYTHONFAULTHANDLER: a worker that hangs is sent SIGABRT at the timeout
  # and prints every thread's stack, so the failure says where it hung.
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu',
             PYTHONFAULTHANDLER='1',
             XLA_FLAGS='--xla_force_host_platform_device_count=4')
  port = free_port()
  config_json = json.dumps(config.to_dict())
  workers = [subprocess.Popen(
      [sys.executable, '-c', WORKER, str(i), str(port), config_json,
       str(workdir)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = []
  for worker in workers:
    try:
      outputs.append(worker.communicate(timeout=400)[0])
    except subprocess.TimeoutExpired:
      stacks = []
      for w in workers:
        if w.poll() is None:
          w.send_signal(signal.SIGABRT)
          try:
            stacks.append(w.communicate(timeout=60)[0][-6000:])
          except subprocess.TimeoutExpired:
            w.kill()
      pytest.fail('multi-process training timed out; the workers were at:\n'
                  + '\n----\n'.join(stacks))
  for worker, output in zip(workers, outputs):
    assert worker.returncode == 0, output[-3000:]
  summaries = [json.loads((workdir / f'summary_{i}.json').read_text())
               for i in range(2)]
  assert summaries[0]['steps'] == summaries[1]['steps'] == NUM_STEPS
  assert summaries[0]['last_eval_accuracy'] == summaries[1][
      'last_eval_accuracy']

  ref_params, ref_accuracy = reference_run(config)
  state, extra = run_state.load_train_state(ml_collections.ConfigDict(
      config.to_dict()), str(workdir))
  assert extra['step'] == NUM_STEPS
  for (path, x), y in zip(
      jax.tree_util.tree_flatten_with_path(ref_params)[0],
      jax.tree.leaves(jax.device_get(state.params))):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=str(path))
  assert summaries[0]['last_eval_accuracy'] == pytest.approx(ref_accuracy)
