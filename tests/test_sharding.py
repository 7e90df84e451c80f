"""Tests of mixer_jax.training.sharding on 8 fake CPU devices.

The work-split tests compile the real jitted train and eval steps that
`compiled.build` builds and read the compiled executables: the
FLOPs one device runs (against the same step compiled for one device) and
the collectives in the optimized HLO.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import quickstart
from mixer_jax import model_from_config
from mixer_jax import models
from mixer_jax.checkpointing import checkpoints
from mixer_jax.training import compiled
from mixer_jax.training import optim
from mixer_jax.training import sharding

N = 8
IMAGE = 8


def tiny_config(**overrides):
  """A 1-block Mixer on 8x8 images whose every size is a multiple of 8."""
  config = quickstart.get_config()
  config.model.num_blocks, config.model.hidden_dim = 1, 32
  config.model.tokens_mlp_dim, config.model.channels_mlp_dim = 16, 64
  config.model.stochastic_depth = 0.1
  # Batch 256: enough work per device that the replicated optimizer update
  # (the same on every device, as in any data-parallel step) stays small.
  config.batch_size, config.grad_accum_steps = 256, 2
  config.pp.mixup_alpha, config.pp.mixup_prob = 0.5, 1.0
  config.optimizer, config.learning_rate, config.warmup_steps = 'sgd', 0.1, 1
  # Every array of this tiny model is far below big_vision's 4 MiB: split
  # them all, so that fsdp has something to split.
  config.fsdp_min_size_mb = 0.0
  config.update(overrides)
  return config


def build(config, devices=None):
  mesh = sharding.create_mesh(devices)
  model = model_from_config.create_model(config, 10)
  tx = optim.create_optimizer(config, 100)
  steps = compiled.build(config, model, mesh, tx=tx, num_train_steps=100)
  return (mesh, steps.init_fn, steps.train_step, steps.eval_step,
          steps.abstract_state)


def abstract_batch(mesh, batch_size, eval_mask=False):
  data = sharding.batch_sharding(mesh)
  batch = {'image': jax.ShapeDtypeStruct((batch_size, IMAGE, IMAGE, 3),
                                         jnp.float32, sharding=data),
           'label': jax.ShapeDtypeStruct((batch_size, 10), jnp.float32,
                                         sharding=data)}
  if eval_mask:
    batch['mask'] = jax.ShapeDtypeStruct((batch_size,), jnp.float32,
                                         sharding=data)
  return batch


def compiled_steps(config, devices=None):
  mesh, _, train_step, eval_step, abstract = build(config, devices)
  train_exe = train_step.lower(abstract, abstract_batch(
      mesh, config.batch_size)).compile()
  eval_exe = eval_step.lower(abstract.params, abstract_batch(
      mesh, config.batch_size, eval_mask=True)).compile()
  return train_exe, eval_exe


def flops(executable):
  cost = executable.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops'])


def collective_shapes(executable, kind):
  """Result shapes of every `kind` collective in the optimized HLO."""
  shapes = []
  for line in executable.as_text().splitlines():
    match = re.search(r' = (.+?) ' + kind + r'(?:-start)?\(', line)
    if match:  # One result, or a tuple of them when XLA combined several.
      for dims in re.findall(r'[a-z]\w*\[([\d,]*)\]', match.group(1)):
        shapes.append(tuple(int(d) for d in dims.split(',') if d))
  return shapes


def test_mesh_spans_all_devices_on_one_data_axis():
  mesh = sharding.create_mesh()
  assert jax.device_count() == N
  assert mesh.axis_names == ('data',)
  assert mesh.devices.shape == (N,)
  assert sharding.create_mesh(jax.devices()[:1]).devices.size == 1


def test_shard_batch_splits_the_leading_axis():
  mesh = sharding.create_mesh()
  images = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  batch = sharding.shard_batch({'image': images, 'label': np.arange(16)}, mesh)
  assert batch['image'].shape == (16, 3)
  shards = sorted(batch['image'].addressable_shards,
                  key=lambda s: s.index[0].start)
  assert len(shards) == N
  for i, shard in enumerate(shards):
    np.testing.assert_array_equal(shard.data, images[2 * i:2 * i + 2])
  np.testing.assert_array_equal(np.asarray(batch['label']), np.arange(16))


def test_put_replicate_and_to_host_round_trip():
  mesh = sharding.create_mesh()
  tree = {'w': np.random.RandomState(0).randn(16, 3).astype(np.float32),
          'step': np.int32(7)}
  placed = sharding.replicate(tree, mesh)
  assert placed['w'].sharding.is_fully_replicated
  assert len(placed['w'].addressable_shards) == N
  split = sharding.put(tree, sharding.state_shardings(tree, mesh, 'fsdp'))
  assert split['w'].addressable_shards[0].data.shape == (2, 3)
  for placed_tree in (placed, split):
    back = sharding.to_host(placed_tree)
    np.testing.assert_array_equal(back['w'], tree['w'])
    assert int(back['step']) == 7


def test_fsdp_splits_the_largest_divisible_axis():
  spec = lambda shape: tuple(sharding.fsdp_spec(shape, N))
  assert spec((768, 3072)) == (None, 'data')
  assert spec((3072, 768)) == ('data', None)
  assert spec((196, 384)) == (None, 'data')  # 196 = 8 * 24.5.
  assert spec((16, 16, 3, 768)) == (None, None, None, 'data')
  assert spec((1000,)) == ('data',)
  assert spec((10,)) == ()  # Not divisible: replicated.
  assert spec(()) == ()
  assert tuple(sharding.fsdp_spec((768, 3072), 1)) == ()


def test_data_parallel_steps_split_the_work_without_gathering_activations():
  # Mixup, stochastic depth and gradient accumulation are all on.
  config = tiny_config()
  train8, eval8 = compiled_steps(config)
  train1, eval1 = compiled_steps(config, jax.devices()[:1])
  assert flops(train8) <= 1.05 * flops(train1) / N
  assert flops(eval8) <= 1.05 * flops(eval1) / N
  for exe in (train8, eval8):
    for kind in ('all-gather', 'all-to-all', 'reduce-scatter'):
      assert not collective_shapes(exe, kind), kind
  # Mixup's roll by one: each device sends one example (image and label)
  # to the next; nothing else moves between devices but the sums below.
  assert sorted(collective_shapes(train8, 'collective-permute')) == sorted(
      [(1, IMAGE, IMAGE, 3), (1, 10)])
  assert not collective_shapes(eval8, 'collective-permute')
  # Gradients (and metrics) summed over devices.
  assert collective_shapes(train8, 'all-reduce')


def _state_bytes_per_device(abstract_state):
  return sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(abstract_state))


def _state_bytes(abstract_state):
  return sum(np.prod(x.shape) * x.dtype.itemsize
             for x in jax.tree.leaves(abstract_state))


def test_fsdp_divides_state_and_gathers_only_parameters():
  config = tiny_config(optimizer='adam', sharding='fsdp')
  mesh, _, train_step, _, abstract = build(config)
  replicated_abstract = build(tiny_config(optimizer='adam'))[-1]
  assert (_state_bytes_per_device(abstract) <=
          1.1 / N * _state_bytes_per_device(replicated_abstract))
  assert _state_bytes(abstract) == _state_bytes(replicated_abstract)
  train8 = train_step.lower(abstract, abstract_batch(mesh, 256)).compile()
  train1 = compiled_steps(tiny_config(optimizer='adam'),
                          jax.devices()[:1])[0]
  assert flops(train8) <= 1.05 * flops(train1) / N
  # Every gathered array is a whole parameter, never an activation.
  param_shapes = {tuple(x.shape) for x in jax.tree.leaves(abstract.params)}
  gathered = collective_shapes(train8, 'all-gather')
  assert gathered and set(gathered) <= param_shapes
  assert not collective_shapes(train8, 'all-to-all')


def _random_batches(count, batch_size=256):
  rng = np.random.RandomState(0)
  return [{'image': rng.uniform(-1, 1, (batch_size, IMAGE, IMAGE, 3))
                      .astype(np.float32),
           'label': np.eye(10, dtype=np.float32)[rng.randint(0, 10,
                                                             batch_size)]}
          for _ in range(count)]


def _train(config, batches, devices=None, state=None, built=None):
  mesh, init_fn, train_step, _, _ = built or build(config, devices)
  if state is None:
    state = init_fn(jax.random.PRNGKey(0))
  for batch in batches:
    state, _ = train_step(state, sharding.shard_batch(batch, mesh))
  return state


def _assert_close(a, b):
  for x, y in zip(jax.tree.leaves(sharding.to_host(a)),
                  jax.tree.leaves(sharding.to_host(b))):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_fsdp_trains_like_replicated():
  batches = _random_batches(3)
  fsdp = _train(tiny_config(sharding='fsdp'), batches)
  kernel = fsdp.params['MixerBlock_0']['channel_mixing']['Dense_0']['kernel']
  assert kernel.addressable_shards[0].data.shape == (32, 8)
  _assert_close(fsdp, _train(tiny_config(), batches))


def test_fsdp_checkpoint_restores_replicated_on_one_device(tmp_path):
  batches = _random_batches(4)
  fsdp = build(tiny_config(sharding='fsdp'))
  state = _train(None, batches[:2], built=fsdp)
  saver = checkpoints.Checkpointer(tmp_path, keep=1, keep_best=False)
  saver.save(2, state)
  saver.wait_until_finished()
  saver.close()
  one = build(tiny_config(), jax.devices()[:1])
  loader = checkpoints.Checkpointer(tmp_path, keep=1, keep_best=False)
  restored, _ = loader.restore(one[-1])
  loader.close()
  leaf = restored.params['stem']['kernel']
  assert leaf.sharding.is_fully_replicated and len(leaf.devices()) == 1
  _assert_close(restored, state)
  _assert_close(_train(None, batches[2:], state=restored, built=one),
                _train(None, batches[2:], state=state, built=fsdp))


def test_prefetch_keeps_order_and_yields_everything():
  mesh = sharding.create_mesh()
  batches = [{'x': np.full((8,), i, np.float32)} for i in range(5)]
  out = [float(b['x'][0]) for b in sharding.prefetch(batches, mesh, size=3)]
  assert out == [0.0, 1.0, 2.0, 3.0, 4.0]
  assert list(sharding.prefetch([], mesh)) == []


def test_prefetch_raises_the_input_error():
  mesh = sharding.create_mesh()

  def host_batches():
    yield {'x': np.zeros((8,), np.float32)}
    raise ValueError('bad record')

  with pytest.raises(ValueError, match='bad record'):
    list(sharding.prefetch(host_batches(), mesh))


def test_initialize_distributed_needs_all_three_arguments():
  with pytest.raises(ValueError, match='num_processes and process_id'):
    sharding.initialize_distributed('127.0.0.1:1234')


def _replica_groups(line):
  """The device groups of one collective line of optimized HLO."""
  explicit = re.search(r'replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}',
                       line)
  if explicit:
    return [[int(d) for d in g.split(',') if d]
            for g in re.findall(r'\{([\d,]*)\}', explicit.group(1))]
  # Mesh form: replica_groups=mesh['axis_0'=4,'axis_1'=2],
  # device_ids=([2,4]T(1,0)) {'axis_0'}: the device ids laid out over the
  # named axes, grouped along the axes in braces.
  named = re.search(r"replica_groups=mesh\[([^\]]*)\], device_ids=\(\[([\d,]+)\]"
                    r"(?:T\(([\d,]+)\))?\) \{([^}]*)\}", line)
  if named:
    axes = re.findall(r"'(\w+)'=(\d+)", named.group(1))
    ids = np.arange(np.prod([int(d) for d in named.group(2).split(',')]))
    ids = ids.reshape([int(d) for d in named.group(2).split(',')])
    if named.group(3):
      ids = ids.transpose([int(p) for p in named.group(3).split(',')])
    ids = ids.reshape([int(size) for _, size in axes])
    grouped = [i for i, (name, _) in enumerate(axes)
               if f"'{name}'" in named.group(4)]
    others = [i for i in range(len(axes)) if i not in grouped]
    size = int(np.prod([ids.shape[i] for i in grouped]))
    return ids.transpose(others + grouped).reshape(-1, size).tolist()
  # Iota form: [groups,size]<=[dims] with an optional transpose T(perm).
  iota = re.search(r'replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\]'
                   r'(?:T\(([\d,]+)\))?', line)
  assert iota, line
  dims = [int(d) for d in iota.group(3).split(',')]
  ids = np.arange(np.prod(dims)).reshape(dims)
  if iota.group(4):
    ids = ids.transpose([int(p) for p in iota.group(4).split(',')])
  return ids.reshape(int(iota.group(1)), int(iota.group(2))).tolist()


def test_data_by_fsdp_mesh_gathers_parameters_within_groups_of_four():
  # big_vision's mesh config: 2 groups (e.g. hosts) of 4 devices; parameters
  # split within a group, replicated across the two.
  config = tiny_config(optimizer='adam', sharding='fsdp',
                       mesh=(('data', 2), ('fsdp', 4)))
  mesh = sharding.create_mesh(axes=config.mesh)
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 4}
  model = model_from_config.create_model(config, 10)
  steps = compiled.build(config, model, mesh,
                         tx=optim.create_optimizer(config, 100),
                         num_train_steps=100)
  abstract = steps.abstract_state
  train = steps.train_step.lower(abstract, abstract_batch(mesh, 256)).compile()
  train1 = compiled_steps(tiny_config(optimizer='adam'), jax.devices()[:1])[0]
  assert flops(train) <= 1.05 * flops(train1) / N  # The batch: 8 ways.
  # State: 4 ways (not 8, not 1).
  total = _state_bytes(abstract)
  assert 0.24 * total <= _state_bytes_per_device(abstract) <= 0.26 * total
  gathers = [line for line in train.as_text().splitlines()
             if re.search(r' all-gather(?:-start)?\(', line)]
  assert gathers
  param_shapes = {tuple(x.shape) for x in jax.tree.leaves(abstract.params)}
  assert set(collective_shapes(train, 'all-gather')) <= param_shapes
  for line in gathers:  # Within {0..3} and {4..7}: the fsdp axis alone.
    groups = _replica_groups(line)
    assert sorted(map(sorted, groups)) == [[0, 1, 2, 3], [4, 5, 6, 7]], line


def test_bad_mesh_is_a_clear_error():
  with pytest.raises(ValueError, match='needs a multiple of 3 devices'):
    sharding.create_mesh(axes=(('data', -1), ('fsdp', 3)))
  with pytest.raises(ValueError, match="axes named 'data' and 'fsdp'"):
    sharding.create_mesh(axes=(('model', -1),))
  with pytest.raises(ValueError, match='at most one -1'):
    sharding.create_mesh(axes=(('data', -1), ('fsdp', -1)))


def test_fsdp_leaves_small_arrays_replicated_as_big_vision():
  # Mixer-B/16 under big_vision's fsdp(min_size_to_shard_mb=4) on 8
  # devices: of its 150 float32 leaves only the 24 channel-mixing kernels
  # (768 x 3072 x 4 B = 9 MiB) exceed 4 MiB; the head (768 x 1000 x 4 B =
  # 2.9 MiB), stem (2.25 MiB) and token-mixing kernels stay whole.
  model = models.create_model('B_16', 1000)
  shapes = models.param_shapes(model, 224)
  placed = sharding.state_shardings(shapes, sharding.create_mesh(), 'fsdp',
                                    min_size_mb=4.0)
  split = {'/'.join(str(k.key) for k in path)
           for path, s in jax.tree_util.tree_leaves_with_path(placed)
           if not s.is_fully_replicated}
  assert len(jax.tree.leaves(shapes)) == 150
  assert len(split) == 24
  assert all(re.fullmatch(r'MixerBlock_\d+/channel_mixing/Dense_[01]/kernel',
                          p) for p in split)
