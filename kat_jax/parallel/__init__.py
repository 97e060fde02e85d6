"""Device mesh, logical-axis rules, global batches and multi-process start-up (sharded train
state: kat_jax/train/state.py)."""

from kat_jax.parallel.distributed import initialize_distributed, wait_for_all_processes
from kat_jax.parallel.mesh import (BATCH_AXES, LOGICAL_RULES, MESH_AXES, batch_sharding,
                                   sharding_context,
                                   logical_to_sharding, make_mesh, replicated)
from kat_jax.parallel.sharding import global_batch, strip_boxes

__all__ = ["BATCH_AXES", "LOGICAL_RULES", "MESH_AXES", "batch_sharding", "global_batch",
           "initialize_distributed", "logical_to_sharding", "make_mesh", "replicated",
           "sharding_context", "strip_boxes", "wait_for_all_processes"]
