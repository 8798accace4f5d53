"""Multi-host start-up, assembly of per-host batches into global arrays, and host helpers."""

import os
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, local_device_count: Optional[int] = None) -> None:
  """Starts `jax.distributed` when there is more than one process; a no-op otherwise.

  Arguments default to the environment (`JAX_COORDINATOR_ADDRESS`,
  `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`); on TPU pods and SLURM, JAX finds them
  itself when `num_processes` is not given but the cluster is detected.
  """
  coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
  num_processes = num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0") or 0) or None
  if process_id is None and os.environ.get("JAX_PROCESS_ID"):
    process_id = int(os.environ["JAX_PROCESS_ID"])
  if local_device_count:
    jax.config.update("jax_num_cpu_devices", int(local_device_count))
  if num_processes in (None, 1) and coordinator is None:
    if any(k in os.environ for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")):
      jax.distributed.initialize()  # cluster auto-detection
    return
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id)


def global_batch(local: dict, sharding: NamedSharding) -> dict:
  """Per-host arrays (this host's rows) -> global arrays sharded along the batch axis."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


# ----------------------------------------------------------------------------- host helpers

def any_process(flag: bool) -> bool:
  """Whether `flag` is true on any process (e.g. SIGTERM seen: all must stop at the same step)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def sum_over_processes(values: np.ndarray) -> np.ndarray:
  """The element-wise sum of `values` over processes (counts, token totals)."""
  if jax.process_count() == 1:
    return values
  return np.asarray(multihost_utils.process_allgather(values)).reshape(-1, *values.shape).sum(0)


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier of this name."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def local_rows(x: jax.Array) -> np.ndarray:
  """This host's rows of a global array sharded on its leading axis, in order."""
  if jax.process_count() == 1:
    return np.asarray(x)
  shards = {}
  for s in x.addressable_shards:  # replicas (over non-batch mesh axes) collapse by start index
    shards.setdefault(s.index[0].start or 0, s.data)
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])
