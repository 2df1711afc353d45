"""The device mesh from config sizes, and clear errors when it does not fit."""

import jax
import pytest
from ml_collections import ConfigDict

from fdjax import config as config_lib
from fdjax import sharding as sharding_lib


def _mesh_config(**sizes):
  c = config_lib.base_config().mesh
  c.update(sizes)
  return c


def test_minus_one_fills_the_remaining_devices():
  mesh = sharding_lib.make_mesh(_mesh_config(data=-1, fsdp=2, tensor=2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_mesh_that_does_not_fit_the_devices_is_an_error():
  with pytest.raises(ValueError, match="product 12, but there are 8 devices"):
    sharding_lib.make_mesh(_mesh_config(data=3, fsdp=2, tensor=2))
  with pytest.raises(ValueError, match="do not divide"):
    sharding_lib.make_mesh(_mesh_config(data=-1, fsdp=3, tensor=1))


def test_batch_not_divisible_by_data_parallel_size_is_an_error():
  mesh = sharding_lib.make_mesh(_mesh_config(data=4, fsdp=2, tensor=1))
  rules = config_lib.DEFAULT_RULES
  sharding_lib.check_batch_size(16, mesh, rules)
  with pytest.raises(ValueError, match="data-parallel size 8"):
    sharding_lib.check_batch_size(12, mesh, rules)
  with pytest.raises(ValueError, match="grad_accum_steps=3"):
    sharding_lib.check_batch_size(16, mesh, rules, grad_accum_steps=3)


def test_logical_spec_maps_through_rules():
  mesh = sharding_lib.make_mesh(ConfigDict(dict(data=2, fsdp=2, tensor=2)))
  rules = config_lib.DEFAULT_RULES
  P = jax.sharding.PartitionSpec
  assert sharding_lib.logical_sharding(mesh, rules, ("embed", "mlp")).spec == P("fsdp", "tensor")
  # An activation's batch axis already uses `fsdp`, so its `embed` axis stays unsharded.
  assert sharding_lib.logical_sharding(mesh, rules, ("batch", "time", "embed")).spec == P(
    ("data", "fsdp"), None, None
  )
