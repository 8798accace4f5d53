"""Device meshes and the map from logical axis names to mesh axes.

Modules name axes (`embed`, `mlp`, `heads`, `kv`, `vocab`, `batch`, ...); the
config's `rules` map them to the mesh axes `data`, `fsdp`, `tensor`. The same
model then runs data-parallel, fully sharded or tensor-parallel by config alone.
"""

from typing import Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

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

  Linen's logical partitioning needs `Auto` axes (the JAX default is Explicit).
  """
  devices = list(jax.devices() if devices is None else devices)
  unknown = sorted(set(shape) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"unknown mesh axes {unknown}; the mesh has {MESH_AXES}")
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if -1 in sizes:
    known = int(np.prod([s for s in sizes if s != -1]))
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not divide into mesh {dict(zip(MESH_AXES, sizes))}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"{len(devices)} are available")
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=devices)


def logical_shardings(logical_specs, mesh: Mesh, rules=DEFAULT_RULES):
  """A tree of logical `PartitionSpec`s -> a tree of `NamedSharding`s on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, [tuple(r) for r in rules])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
  """Leading (batch) axis over the mesh axes the rules give `batch`."""
  axes = dict((k, v) for k, v in (tuple(r) for r in rules)).get("batch")
  return NamedSharding(mesh, P(axes))
