"""Multi-host start-up and assembly of per-host batches into global arrays."""

import os
from typing import Optional

import jax
import numpy as np
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
