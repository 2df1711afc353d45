"""The device mesh and the logical-axis sharding rules.

Sharding is data, not code: parameters and activations carry logical axis names (`batch`,
`embed`, `mlp`, ...) and one rules table in the config maps them to the mesh axes `data`, `fsdp`
and `tensor`. This module builds the mesh from the config sizes and turns logical specs into
`NamedSharding`s. Axes are `AxisType.Auto`, so Flax's logical constraints act as sharding hints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Sequence[tuple[str, Any]]


def _fill(sizes: list[int], total: int, what: str) -> list[int]:
  """Replaces a single -1 in `sizes` by what makes their product `total`."""
  if sizes.count(-1) > 1:
    raise ValueError(f"{what}: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if total % known:
      raise ValueError(
        f"{what}: {total} devices do not divide by the fixed axes "
        f"{dict(zip(MESH_AXES, sizes))} (product {known})"
      )
    sizes = [total // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != total:
    raise ValueError(
      f"{what}: axes {dict(zip(MESH_AXES, sizes))} have product {math.prod(sizes)}, "
      f"but there are {total} devices"
    )
  return sizes


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the (`data`, `fsdp`, `tensor`) mesh from config sizes.

  With one process the sizes cover all devices. With several (multi-host), the `dcn_*` sizes
  say how each axis is split across processes (default: data parallel across processes), the
  others how it is split within a process, and the devices are laid out by
  `mesh_utils.create_hybrid_device_mesh` so collectives along an axis stay on fast links.
  """
  devices = list(devices if devices is not None else jax.devices())
  ici = [int(mesh_config[a]) for a in MESH_AXES]
  num_processes = len({d.process_index for d in devices})
  if num_processes == 1:
    shape = _fill(ici, len(devices), "mesh")
    try:
      array = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, AssertionError, NotImplementedError):
      array = np.asarray(devices).reshape(shape)
  else:
    dcn = [int(mesh_config[f"dcn_{a}"]) for a in MESH_AXES]
    dcn = _fill(dcn, num_processes, "mesh across processes (dcn_*)")
    ici = _fill(ici, len(devices) // num_processes, "mesh within a process")
    # Off TPU, each process is one "granule" (JAX would otherwise group devices by slice, and
    # every CPU or GPU device is in slice 0).
    array = mesh_utils.create_hybrid_device_mesh(
      ici,
      dcn,
      devices,
      process_is_granule=devices[0].platform != "tpu",
      allow_split_physical_axes=True,
    )
  return Mesh(array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def as_rules(rules: Rules) -> tuple[tuple[str, Any], ...]:
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def logical_sharding(mesh: Mesh, rules: Rules, logical: tuple[str | None, ...]) -> NamedSharding:
  """The `NamedSharding` of an array whose axes have the logical names `logical`."""
  spec = nn.logical_to_mesh_axes(logical, as_rules(rules))
  return NamedSharding(mesh, spec)


def tree_shardings(mesh: Mesh, rules: Rules, logical_specs: Any) -> Any:
  """Maps a tree of logical `PartitionSpec`s (from `nn.get_partition_spec`) to shardings."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, as_rules(rules))


def batch_axes(rules: Rules) -> tuple[str, ...]:
  """The mesh axes that the logical `batch` axis is sharded over."""
  for name, axes in as_rules(rules):
    if name == "batch":
      if axes is None:
        return ()
      return (axes,) if isinstance(axes, str) else tuple(axes)
  return ()


def data_parallel_size(mesh: Mesh, rules: Rules) -> int:
  return math.prod(mesh.shape[a] for a in batch_axes(rules))


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Sharding of batch arrays: leading axis over the `batch` mesh axes, the rest replicated."""
  axes = batch_axes(rules)
  return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def check_batch_size(batch_size: int, mesh: Mesh, rules: Rules, grad_accum_steps: int = 1) -> None:
  """Fails clearly unless every micro-batch splits evenly over the data-parallel devices."""
  if batch_size % grad_accum_steps:
    raise ValueError(
      f"batch_size={batch_size} does not divide by grad_accum_steps={grad_accum_steps}"
    )
  micro = batch_size // grad_accum_steps
  dp = data_parallel_size(mesh, rules)
  if micro % dp:
    raise ValueError(
      f"the micro-batch of {micro} examples (batch_size={batch_size} / grad_accum_steps="
      f"{grad_accum_steps}) does not divide by the data-parallel size {dp} "
      f"(mesh axes {batch_axes(rules)} of mesh {dict(mesh.shape)})"
    )
  if batch_size % jax.process_count():
    raise ValueError(
      f"batch_size={batch_size} does not divide by the {jax.process_count()} processes"
    )
