"""Device meshes with the axes `data`, `fsdp`, `sequence`, `tensor` built from a config."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

# Outermost first: `tensor` last so that it lands on the fastest (innermost) links.
MESH_AXES = ("data", "fsdp", "sequence", "tensor")


def mesh_shape(config: Mapping[str, int] | None = None, num_devices: int | None = None) -> dict[str, int]:
  """Resolves a config of axis sizes to `{axis: size}` over MESH_AXES.

  Missing axes are 1; one axis may be -1, meaning "the devices left over". With no config every
  device goes to `data`.
  """
  num_devices = jax.device_count() if num_devices is None else num_devices
  config = dict(config or {"data": -1})
  unknown = sorted(set(config) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"mesh config has unknown axes {unknown}; expected a subset of {list(MESH_AXES)}")
  sizes = {name: int(config.get(name, 1)) for name in MESH_AXES}
  free = [name for name, size in sizes.items() if size == -1]
  bad = {name: size for name, size in sizes.items() if size == 0 or size < -1}
  if bad or len(free) > 1:
    raise ValueError(f"mesh config {config}: sizes must be positive with at most one -1, got {sizes}")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f"mesh config {config}: {num_devices} devices are not divisible by the fixed axes' {fixed}")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"mesh config {config} has {math.prod(sizes.values())} devices, expected {num_devices}")
  return sizes


def make_mesh(config: Mapping[str, int] | None = None, *, devices: Sequence[jax.Device] | None = None,
              dcn_data: int = 1, process_axis: str | None = None) -> Mesh:
  """A `Mesh` over MESH_AXES (every axis present, unused ones of size 1), all axes `AxisType.Auto`.

  Args:
    config: axis sizes, e.g. `{"data": 2, "fsdp": -1}` or an `ml_collections.ConfigDict`.
    devices: the devices to use (default: all, across every host).
    dcn_data: number of slices of a multi-slice TPU job; the `data` axis is split across slices
      (data-centre network) and the other axes stay inside a slice.
    process_axis: the axis along which the processes (hosts) lie, e.g. "sequence" to split sequences across
      hosts; the other axes stay inside each process. None: jax's placement (processes along the outer axes).
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(config, len(devices))
  shape = tuple(sizes[name] for name in MESH_AXES)
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if process_axis:
    if dcn_data > 1:
      raise ValueError(f"process_axis={process_axis!r} and dcn_data={dcn_data}: give one of them")
    return Mesh(_processes_along(process_axis, sizes, devices), MESH_AXES, axis_types=axis_types)
  if dcn_data > 1:
    if sizes["data"] % dcn_data:
      raise ValueError(f"dcn_data={dcn_data} must divide the data axis {sizes['data']}")
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    ici = (sizes["data"] // dcn_data,) + shape[1:]
    dcn = (dcn_data,) + (1,) * (len(shape) - 1)
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)
  try:
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    # Topology-aware placement does not cover every device list (e.g. a subset); fall back to order.
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def _processes_along(axis: str, sizes: Mapping[str, int], devices: Sequence[jax.Device]) -> np.ndarray:
  """Devices shaped by `sizes` with the processes along `axis`: process p's devices fill block p of that axis,
  laid out inside the block as jax places one process's devices."""
  if axis not in MESH_AXES:
    raise ValueError(f"process_axis={axis!r}: expected one of {list(MESH_AXES)}")
  processes = sorted({d.process_index for d in devices})
  if sizes[axis] % len(processes):
    raise ValueError(f"process_axis={axis!r}: its size {sizes[axis]} is not a multiple of the {len(processes)} "
                     "processes")
  inner = dict(sizes, **{axis: sizes[axis] // len(processes)})
  shape = tuple(inner[name] for name in MESH_AXES)
  blocks = []
  for p in processes:
    local = [d for d in devices if d.process_index == p]
    if len(local) != math.prod(shape):
      raise ValueError(f"process_axis={axis!r}: process {p} has {len(local)} devices, expected {math.prod(shape)} "
                       f"(every process the same number)")
    try:
      blocks.append(np.asarray(jax.make_mesh(shape, MESH_AXES, devices=local).devices))
    except (ValueError, NotImplementedError, AssertionError):
      blocks.append(np.asarray(local).reshape(shape))
  return np.concatenate(blocks, axis=MESH_AXES.index(axis))
