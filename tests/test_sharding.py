"""Tests of mixer_jax.sharding on 8 fake CPU devices."""

import jax
import numpy as np
import pytest

from mixer_jax import sharding


def test_mesh_spans_all_devices_on_one_data_axis():
  mesh = sharding.create_mesh()
  assert jax.device_count() == 8
  assert mesh.axis_names == ('data',)
  assert mesh.devices.shape == (8,)
  assert sharding.create_mesh(jax.devices()[:1]).devices.size == 1


def test_shard_batch_splits_the_leading_axis():
  mesh = sharding.create_mesh()
  images = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  batch = sharding.shard_batch({'image': images, 'label': np.arange(16)}, mesh)
  assert batch['image'].shape == (16, 3)
  shards = sorted(batch['image'].addressable_shards,
                  key=lambda s: s.index[0].start)
  assert len(shards) == 8
  for i, shard in enumerate(shards):
    np.testing.assert_array_equal(shard.data, images[2 * i:2 * i + 2])
  np.testing.assert_array_equal(np.asarray(batch['label']), np.arange(16))


def test_replicate_and_to_host_round_trip():
  mesh = sharding.create_mesh()
  tree = {'w': np.random.RandomState(0).randn(3, 4).astype(np.float32),
          'step': np.int32(7)}
  placed = sharding.replicate(tree, mesh)
  assert placed['w'].sharding.is_fully_replicated
  assert len(placed['w'].addressable_shards) == 8
  back = sharding.to_host(placed)
  np.testing.assert_array_equal(back['w'], tree['w'])
  assert int(back['step']) == 7


def test_local_batch_size_checks_divisibility():
  mesh = sharding.create_mesh()
  assert sharding.local_batch_size(64, mesh) == 64  # One process.
  with pytest.raises(ValueError, match='not divisible by the 8 devices'):
    sharding.local_batch_size(12, mesh)


def test_prefetch_keeps_order_and_yields_everything():
  mesh = sharding.create_mesh()
  batches = [{'x': np.full((8,), i, np.float32)} for i in range(5)]
  out = [float(b['x'][0]) for b in sharding.prefetch(batches, mesh, size=3)]
  assert out == [0.0, 1.0, 2.0, 3.0, 4.0]
  assert list(sharding.prefetch([], mesh)) == []


def test_initialize_distributed_needs_all_three_arguments():
  with pytest.raises(ValueError, match='num_processes and process_id'):
    sharding.initialize_distributed('127.0.0.1:1234')
