"""Meshes, logical-axis rules, multi-host start-up and global batches."""

from vlm_jax.parallel.mesh import DEFAULT_RULES, batch_sharding, logical_shardings, make_mesh, replicated
from vlm_jax.parallel.distributed import any_process, barrier, global_batch, initialize, local_rows, sum_over_processes
