"""Device meshes and the map from logical axis names to mesh axes.

Modules name axes (`embed`, `mlp`, `heads`, `kv`, `vocab`, `batch`, ...); the
config's `rules` map them to the mesh axes `data`, `fsdp`, `tensor`. The same
model then runs data-parallel, fully sharded or tensor-parallel by config alone.

Multi-slice pods: `dcn_data` > 1 in the mesh config splits the devices into that
many slices joined by the data-centre network (DCN); `data`, `fsdp` and `tensor`
then describe one slice (over its fast ICI links) and the `data` axis spans the
slices, slice-major, so only the data-parallel gradient reduction crosses DCN.
"""

from typing import Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
DCN_AXIS = "dcn_data"  # slices, over DCN; folded into `data`

# Parameters are sharded over `fsdp` on their embedding axis and over `tensor`
# on heads / MLP / vocabulary; the batch over `data` and `fsdp`. A mesh axis is
# used at most once per array: where two logical axes want it, the first wins.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("vision_embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("vocab", "tensor"),
    ("proj", None),
    ("layers", None),
)


def make_mesh(shape: dict, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A mesh with axes data × fsdp × tensor; one size may be -1 (all remaining devices).

  With `dcn_data` = S > 1 the sizes are per slice and `data` grows S-fold across
  slices (see the module docstring). Linen's logical partitioning needs `Auto`
  axes (the JAX default is Explicit).
  """
  devices = list(jax.devices() if devices is None else devices)
  unknown = sorted(set(shape) - set(MESH_AXES) - {DCN_AXIS})
  if unknown:
    raise ValueError(f"unknown mesh axes {unknown}; the mesh has {MESH_AXES} (+ {DCN_AXIS!r}: slices)")
  slices = int(shape.get(DCN_AXIS, 1))
  if slices < 1 or len(devices) % slices:
    raise ValueError(f"{DCN_AXIS}={slices} must be a positive divisor of the {len(devices)} devices")
  sizes = _slice_sizes(shape, len(devices) // slices)
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if slices == 1:
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=devices)
  return Mesh(hybrid_device_mesh(sizes, slices, devices), MESH_AXES, axis_types=auto)


def _slice_sizes(shape: dict, n: int) -> list:
  """The data, fsdp, tensor sizes of one slice of `n` devices, with a -1 resolved."""
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if -1 in sizes:
    known = int(np.prod([s for s in sizes if s != -1]))
    if n % known:
      raise ValueError(f"{n} devices do not divide into mesh {dict(zip(MESH_AXES, sizes))}")
    sizes[sizes.index(-1)] = n // known
  if int(np.prod(sizes)) != n:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"{n} are available")
  return sizes


def hybrid_device_mesh(slice_sizes: Sequence[int], slices: int, devices: Sequence[jax.Device]) -> np.ndarray:
  """Devices as [slices × data, fsdp, tensor], slice-major on the first axis.

  Devices that know their slice (`slice_index`: TPU pods) go to
  `mesh_utils.create_hybrid_device_mesh`; others (CPU, a single-slice GPU host)
  are cut into `slices` consecutive blocks, which stand in for slices.
  """
  dcn_shape = (slices,) + (1,) * (len(slice_sizes) - 1)
  if hasattr(devices[0], "slice_index"):
    found = len({d.slice_index for d in devices})
    if found != slices:
      raise ValueError(f"{DCN_AXIS}={slices} but the devices come from {found} slice(s)")
    return mesh_utils.create_hybrid_device_mesh(slice_sizes, dcn_shape, devices, allow_split_physical_axes=True)
  per_slice = len(devices) // slices
  blocks = [mesh_utils.create_device_mesh(slice_sizes, devices[i * per_slice:(i + 1) * per_slice],
                                          allow_split_physical_axes=True) for i in range(slices)]
  return np.concatenate(blocks, axis=0)


def logical_shardings(logical_specs, mesh: Mesh, rules=DEFAULT_RULES):
  """A tree of logical `PartitionSpec`s -> a tree of `NamedSharding`s on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, [tuple(r) for r in rules])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
  """Leading (batch) axis over the mesh axes the rules give `batch`."""
  axes = dict((k, v) for k, v in (tuple(r) for r in rules)).get("batch")
  return NamedSharding(mesh, P(axes))
